"""A LocalCloud instance as a machine of its own: the real user-data, run in a sandbox
that plays Amazon Linux.

Each instance runs the exact bootstrap EC2 would run, as root, in new mount and process
namespaces (``unshare``):

* its own ``/opt``, ``/tmp``, ``/var/lib`` and ``/var/log`` (folders of the instance
  below LocalCloud's directory), and nothing else of this machine's but its system
  folders: every other top-level folder (``/home``, ``/root``, ``/work``, ``/srv``,
  ...) and ``/usr/local`` is an empty ``tmpfs``, so a node that reads a controller file
  it was not given fails as it would on AWS;
* a ``python3`` older than the controller's (as Amazon Linux 2023's 3.9 is) and no
  other Python on the ``PATH``: the bootstrap has to get the controller's;
* stand-ins only for what cannot exist here, in ``/usr/local/bin``: ``dnf`` (installs
  ``python3.X`` from the Pythons this machine has, nothing else), ``systemctl``
  (``start docker``: this machine's engine), ``shutdown`` (the instance ends when the
  bootstrap does), ``aws`` (``s3 cp`` of one object; ``ecr get-login-password`` is
  refused: LocalCloud has no ECR), and ``docker``, which passes everything to this
  machine's engine, translating the instance's paths in ``-v`` to where they are here
  and giving a container the instance's role stand-in (credentials, endpoint, metadata
  URL), as the instance role and metadata service would on EC2.

``pip`` installs from the package index, as on AWS. That takes ~20 s, so the first
instance to build an environment for a set of pinned requirements leaves it in a cache
(``~/.cache/nipype-s3/localcloud``, or ``NIPYPE_S3_LOCALCLOUD_CACHE``), and later
instances start with it in place, as instances of an AMI with the environment baked in
would: the bootstrap then skips ``pip`` and installs only the controller's package.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys

__all__ = ["sandbox_available", "Sandbox", "env_cache_dir"]

#: capabilities root in an instance does not have (see the end of _INIT)
_DROP = ",".join(f"-{cap}" for cap in (
    "sys_admin", "sys_module", "sys_rawio", "sys_ptrace", "sys_boot", "mknod", "net_admin",
    "sys_time", "mac_admin", "mac_override", "linux_immutable", "bpf", "perfmon", "syslog"))

#: top-level folders a machine has (the rest of this machine's are hidden)
_SYSTEM = {"bin", "boot", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "run",
           "sbin", "sys", "usr", "var"}


def _home() -> str:
    """The user's own home (not $HOME, which a test may point elsewhere)."""
    import pwd

    return pwd.getpwuid(os.getuid()).pw_dir


def env_cache_dir() -> str:
    return os.environ.get("NIPYPE_S3_LOCALCLOUD_CACHE") or os.path.join(
        _home(), ".cache", "nipype-s3", "localcloud")


@functools.cache
def sandbox_available() -> str | None:
    """Why instances cannot boot in a sandbox here (None when they can)."""
    if not sys.platform.startswith("linux"):
        return "the sandbox needs Linux namespaces"
    if os.geteuid() != 0:
        return "the sandbox needs root (mount namespaces, overlay mounts)"
    if not shutil.which("unshare"):
        return "no 'unshare' command (util-linux)"
    minor = "{}.{}".format(*sys.version_info[:2])
    if minor not in _pythons():
        return (f"no standalone Python {minor} (pyenv's) for the sandbox's dnf to offer "
                "its instances")
    try:
        ok = subprocess.run(["unshare", "--mount", "--pid", "--fork", "true"],
                            capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return None if ok else "'unshare --mount --pid' is not permitted here"


def _pythons() -> dict[str, str]:
    """``{"3.11": "/path/bin/python3.11"}``: the CPython builds this machine has."""
    found: dict[str, str] = {}
    pyenv = os.environ.get("PYENV_ROOT") or os.path.join(_home(), ".pyenv")
    roots = sorted(glob.glob(os.path.join(pyenv, "versions", "3.*")))
    for root in roots:
        for exe in glob.glob(os.path.join(root, "bin", "python3.*")):
            minor = os.path.basename(exe)[len("python"):]
            if re.fullmatch(r"3\.\d+", minor):
                found[minor] = exe
    return found


def _older_python(than: str) -> str | None:
    """A Python older than ``than`` ("3.11"), the newest such; None if there is none."""
    key = tuple(int(x) for x in than.split("."))
    older = sorted((tuple(int(x) for x in m.split(".")), exe)
                   for m, exe in _pythons().items() if tuple(int(x) for x in m.split(".")) < key)
    return older[-1][1] if older else None


def env_key(user_data: str) -> str | None:
    """The cache key of the environment a bootstrap builds: its Python version and
    pinned requirements (None for a bootstrap that builds none, an image's)."""
    pyv = re.search(r"^PYV=(\S+)$", user_data, re.M)
    reqs = re.search(r'-m pip install --quiet (?!--upgrade)(.+?) \|\|', user_data)
    if not (pyv and reqs):
        return None
    return hashlib.sha256(f"{pyv.group(1)}\n{reqs.group(1)}".encode()).hexdigest()[:20]


_STANDINS = {
    "shutdown": """#!/bin/sh
echo "LocalCloud: shutdown $*: the instance ends with its bootstrap"
""",
    "systemctl": """#!/bin/sh
if [ "$1" = start ] && [ "$2" = docker ]; then
  for _ in $(seq 30); do docker info >/dev/null 2>&1 && exit 0; sleep 1; done
  echo "systemctl: LocalCloud: this machine has no running Docker engine" >&2; exit 1
fi
echo "systemctl: LocalCloud plays only 'systemctl start docker'" >&2; exit 1
""",
    "dnf": """#!/bin/sh
# LocalCloud's dnf: python3.X (and python3.X-pip) from the Pythons this machine has
status=0
for pkg in "$@"; do
  case "$pkg" in
    -*|install) ;;
    python3.*-pip) ;;
    python3.*)
      src=$(grep -x "$pkg=.*" /usr/local/lib/localcloud/pythons | cut -d= -f2-)
      if [ -n "$src" ]; then
        printf '#!/bin/sh\nexec %s "$@"\n' "$src" > "/usr/bin/$pkg"; chmod 755 "/usr/bin/$pkg"
      else echo "Error: Unable to find a match: $pkg" >&2; status=1; fi ;;
    *) echo "Error: Unable to find a match: $pkg (LocalCloud's dnf offers python3.X)" >&2
       status=1 ;;
  esac
done
exit $status
""",
    "aws": """#!/usr/bin/python3
# LocalCloud's AWS CLI: `aws s3 cp s3://bucket/key FILE` (signed, SigV4), nothing else
import datetime, hashlib, hmac, os, sys, urllib.parse, urllib.request
args = sys.argv[1:]
if not (args[:2] == ["s3", "cp"] and len(args) == 4 and args[2].startswith("s3://")):
    sys.exit("aws: LocalCloud plays only 'aws s3 cp s3://bucket/key FILE' (no ECR here)")
bucket, _, key = args[2][5:].partition("/")
endpoint = urllib.parse.urlsplit(os.environ["AWS_ENDPOINT_URL"])
path = "/" + bucket + "/" + urllib.parse.quote(key, safe="/~")
region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
now = datetime.datetime.now(datetime.timezone.utc)
stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
empty = hashlib.sha256(b"").hexdigest()
headers = {"host": endpoint.netloc, "x-amz-content-sha256": empty, "x-amz-date": stamp}
names = ";".join(sorted(headers))
canonical = "\\n".join(["GET", path, ""] + [f"{k}:{headers[k]}" for k in sorted(headers)]
                       + ["", names, empty])
scope = f"{day}/{region}/s3/aws4_request"
to_sign = "\\n".join(["AWS4-HMAC-SHA256", stamp, scope,
                      hashlib.sha256(canonical.encode()).hexdigest()])
k = ("AWS4" + os.environ["AWS_SECRET_ACCESS_KEY"]).encode()
for part in (day, region, "s3", "aws4_request"):
    k = hmac.new(k, part.encode(), hashlib.sha256).digest()
sig = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={os.environ['AWS_ACCESS_KEY_ID']}/"
                            f"{scope}, SignedHeaders={names}, Signature={sig}")
request = urllib.request.Request(f"{endpoint.scheme}://{endpoint.netloc}{path}",
                                 headers=headers)
try:
    with urllib.request.urlopen(request, timeout=60) as resp, open(args[3], "wb") as out:
        out.write(resp.read())
except Exception as exc:
    sys.exit(f"fatal error: {exc}")
print(f"download: {args[2]} to {args[3]}")
""",
    "docker": """#!/usr/bin/python3
# LocalCloud's docker: this machine's engine, which sees this machine's paths
import os, sys
maps = [line.split("=", 1) for line in
        open("/usr/local/lib/localcloud/mounts").read().splitlines() if "=" in line]
label = open("/usr/local/lib/localcloud/instance").read().strip()
def here(path):
    for inside, outside in maps:
        if path == inside or path.startswith(inside.rstrip("/") + "/"):
            return outside + path[len(inside.rstrip("/")):]
    return path
TAKES_VALUE = {"-e", "--env", "--env-file", "--entrypoint", "--network", "--net", "-u",
               "--user", "--name", "-l", "--label", "--gpus", "-w", "--workdir", "--mount",
               "-m", "--memory", "--cpus", "--platform", "--add-host", "--shm-size",
               "--ulimit", "--security-opt", "--cap-add", "--cap-drop", "--device",
               "--pull", "--restart", "-h", "--hostname", "--ipc", "--pid", "--runtime",
               "--tmpfs", "--log-driver", "--log-opt", "--memory-swap", "--cidfile"}
args = sys.argv[1:]
if args and args[0] == "run":
    out = ["run", "--label", "nipype-s3-localcloud=" + label]
    # one engine for every instance: a container's name is the instance's own
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                 "AWS_SDK_UA_APP_ID", "AWS_EC2_METADATA_DISABLED", "NIPYPE_S3_IMDS_URL"):
        if name in os.environ:
            out += ["-e", name]
    # this machine reaches the package index through its own CA: pip in a container too
    ca = "/etc/ssl/certs/ca-certificates.crt"
    if os.path.isfile(ca):
        out += ["-v", f"{ca}:/etc/nipype-s3-localcloud-ca.pem:ro",
                "-e", "PIP_CERT=/etc/nipype-s3-localcloud-ca.pem"]
    rest = args[1:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in ("-v", "--volume") and i + 1 < len(rest):
            src, sep, tail = rest[i + 1].partition(":")
            out += [arg, (here(src) if src.startswith("/") else src) + sep + tail]
            i += 2
            continue
        out.append(arg)
        if not arg.startswith("-"):  # the image: the rest is the container's
            out += rest[i + 1:]
            break
        if arg in TAKES_VALUE and i + 1 < len(rest):
            out.append(rest[i + 1] + ("-" + label if arg == "--name" else ""))
            i += 1
        i += 1
    args = out
os.execv("/usr/local/lib/localcloud/docker", ["docker"] + args)
""",
}

_INIT = r"""
set -eu
R="$1"; SCRIPT="$2"; OLD_PY="$3"; USES_DOCKER="$4"; KEEP=${KEEP:-}
# only ever in namespaces of its own (unshare --mount --pid --fork): never this machine's
if [ "$$" != 1 ]; then
  echo "LocalCloud sandbox: not in a namespace of its own; nothing done" >&2; exit 70
fi
mount --make-rprivate /
# what stays reachable once the machine's folders are hidden: under /mnt
mount -t tmpfs localcloud /mnt
mkdir -p /mnt/i /mnt/py /mnt/lib /mnt/env
mount --bind "$R" /mnt/i
while IFS== read -r name exe; do
  mkdir -p "/mnt/py/$name"; mount --bind -o ro "$(dirname "$(dirname "$exe")")" "/mnt/py/$name"
done < "$R/sandbox/pythons"
cp -a "$R/sandbox/lib/." /mnt/lib/
DOCKER=$(command -v docker || true)
if [ -n "$DOCKER" ]; then touch /mnt/lib/docker; mount --bind "$DOCKER" /mnt/lib/docker; fi
# this machine's Docker engine, for an instance whose bootstrap runs an image (its nodes
# run in containers, which do not get it); no other instance reaches it
if [ "$USES_DOCKER" = 1 ] && [ -S /run/docker.sock ]; then
  touch /mnt/lib/docker.sock; mount --bind /run/docker.sock /mnt/lib/docker.sock
fi
if [ -e "$R/sandbox/env" ]; then mount --bind -o ro "$(readlink -f "$R/sandbox/env")" /mnt/env; fi
# hide every folder that is not a system one, then /usr/local
for d in /*; do
  name=${d#/}
  case " $SYSTEM mnt " in *" $name "*) continue ;; esac
  if [ -d "$d" ] && [ ! -L "$d" ]; then mount -t tmpfs localcloud "$d"
  elif [ -f "$d" ]; then mount --bind /dev/null "$d"; fi
done
mount -t tmpfs localcloud /usr/local
mkdir -p /usr/local/bin /usr/local/lib/localcloud
cp -a /mnt/lib/mounts /mnt/lib/instance /usr/local/lib/localcloud/
if [ -e /mnt/lib/docker ]; then
  touch /usr/local/lib/localcloud/docker
  mount --bind /mnt/lib/docker /usr/local/lib/localcloud/docker
fi
cp -a /mnt/i/sandbox/bin/. /usr/local/bin/
# the instance's own folders
for pair in opt:/opt tmp:/tmp varlib:/var/lib log:/var/log; do
  src=/mnt/i/${pair%%:*}; dst=${pair#*:}
  mkdir -p "$src" "$dst"; mount --bind "$src" "$dst"
done
chmod 1777 /tmp
mount -t tmpfs localcloud /var/tmp
# the Pythons, where they were built to live (not on the PATH)
while IFS== read -r name exe; do
  prefix=$(dirname "$(dirname "$exe")")
  mkdir -p "$prefix"; mount --bind -o ro "/mnt/py/$name" "$prefix"
done < /mnt/i/sandbox/pythons
cp /mnt/i/sandbox/pythons /usr/local/lib/localcloud/pythons
# /usr/bin without this machine's Pythons; python3 is an older one
mkdir -p /mnt/i/usrbin/upper /mnt/i/usrbin/work
for f in /usr/bin/python3* /usr/bin/pip /usr/bin/pip3*; do
  [ -e "$f" ] || [ -L "$f" ] || continue
  name=$(basename "$f")
  [ -e "/mnt/i/usrbin/upper/$name" ] || mknod "/mnt/i/usrbin/upper/$name" c 0 0
done
mount -t overlay localcloud \
  -o lowerdir=/usr/bin,upperdir=/mnt/i/usrbin/upper,workdir=/mnt/i/usrbin/work /usr/bin
if [ -n "$OLD_PY" ]; then ln -sf "$OLD_PY" /usr/bin/python3; fi
# an environment another instance built (an AMI with it baked in)
if [ -d /mnt/env/venv ]; then
  mkdir -p /mnt/i/envup/upper /mnt/i/envup/work /opt/nipype-s3
  mount -t overlay localcloud /opt/nipype-s3 \
    -o lowerdir=/mnt/env/venv,upperdir=/mnt/i/envup/upper,workdir=/mnt/i/envup/work
  xargs -r /usr/local/bin/dnf install -y < /mnt/env/pythons
fi
# where cloud-init keeps it; then LocalCloud's own folder goes out of sight
mkdir -p /var/lib/cloud/instance /root
cp "$SCRIPT" /var/lib/cloud/instance/user-data.txt
# a machine's /dev (not this machine's disks) and /run
mkdir -p /mnt/dev
mount -t tmpfs -o mode=755 localcloud /mnt/dev
for d in null zero full random urandom tty; do
  touch "/mnt/dev/$d"; mount --bind "/dev/$d" "/mnt/dev/$d"
done
mkdir -p /mnt/dev/shm /mnt/dev/pts
ln -s /proc/self/fd /mnt/dev/fd; ln -s /proc/self/fd/0 /mnt/dev/stdin
ln -s /proc/self/fd/1 /mnt/dev/stdout; ln -s /proc/self/fd/2 /mnt/dev/stderr
mount --move /mnt/dev /dev
mount -t tmpfs localcloud /dev/shm
mount -t tmpfs localcloud /run
if [ -e /mnt/lib/docker.sock ]; then
  touch /run/docker.sock; mount --bind /mnt/lib/docker.sock /run/docker.sock
fi
umount -l /mnt
mount -t tmpfs localcloud /mnt
# the machine's own files are read-only to the instance (its folders above are not)
mount -o remount,bind,ro /
cd /
# the instance's environment: only the role stand-in's variables (values never in a
# file or an argument list) and a machine's own
export PATH=/usr/local/bin:/usr/bin:/usr/sbin:/bin:/sbin HOME=/root LANG=C.UTF-8
keep=" $KEEP PATH HOME LANG "
for name in $(compgen -e); do
  case "$keep" in *" $name "*) ;; *) unset "$name" ;; esac
done
# root, as on EC2, but without the powers that would undo the above (mounts, raw devices,
# kernel modules, tracing other processes)
exec setpriv --bounding-set "$DROP" -- /bin/bash /var/lib/cloud/instance/user-data.txt
"""


class Sandbox:
    """How one instance boots: the files it needs under ``root`` and its command."""

    def __init__(self, root: str, instance_id: str, env: dict[str, str],
                 controller_python: str | None = None) -> None:
        self.root = root
        self.instance_id = instance_id
        self.env = env
        self.minor = controller_python or "{}.{}".format(*sys.version_info[:2])
        self.env_key: str | None = None

    def prepare(self, user_data: str) -> list[str]:
        """Write the instance's files; return the command that boots it."""
        box = os.path.join(self.root, "sandbox")
        for sub in ("bin", "lib"):
            os.makedirs(os.path.join(box, sub), exist_ok=True)
        for name, text in _STANDINS.items():
            path = os.path.join(box, "bin", name)
            with open(path, "w") as fobj:
                fobj.write(text)
            os.chmod(path, 0o755)
        mounts = [f"/opt={self.root}/opt", f"/tmp={self.root}/tmp",
                  f"/var/lib={self.root}/varlib", f"/var/log={self.root}/log"]
        with open(os.path.join(box, "lib", "mounts"), "w") as fobj:
            fobj.write("\n".join(mounts) + "\n")
        with open(os.path.join(box, "lib", "instance"), "w") as fobj:
            fobj.write(self.instance_id)
        with open(os.path.join(box, "pythons"), "w") as fobj:
            fobj.write("".join(f"python{m}={exe}\n" for m, exe in sorted(_pythons().items())))
        script = os.path.join(box, "user-data.sh")
        with open(script, "w") as fobj:
            fobj.write(user_data)
        self.env_key = env_key(user_data)
        cached = os.path.join(env_cache_dir(), self.env_key or "-")
        if self.env_key and os.path.isdir(os.path.join(cached, "venv")):
            os.symlink(cached, os.path.join(box, "env"))
        init = os.path.join(box, "init.sh")
        with open(init, "w") as fobj:
            fobj.write(f"SYSTEM={' '.join(sorted(_SYSTEM))!r}\nDROP={_DROP!r}\n" + _INIT)
        old = _older_python(self.minor) or ""
        # Docker for the instances that run it: an image's agent, EC2ContainerRun's job
        uses_docker = "1" if re.search(r"^IMAGE=", user_data, re.M) or \
            "one_job" in user_data else "0"
        return ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "bash", init,
                self.root, "/mnt/i/sandbox/user-data.sh", old, uses_docker]

    def environment(self) -> dict[str, str]:
        """The process environment of the command: the instance's variables, and the
        names the sandbox keeps (the rest of this machine's environment is dropped)."""
        return dict(self.env, KEEP=" ".join(sorted(self.env)),
                    PATH=os.environ.get("PATH", "/usr/bin:/bin"))

    def save_environment(self) -> bool:
        """Keep the environment this instance's bootstrap built (once its agent runs)
        for later instances; False when there is none or one is kept already."""
        if not self.env_key:
            return False
        dest = os.path.join(env_cache_dir(), self.env_key)
        venv = os.path.join(self.root, "opt", "nipype-s3")
        if os.path.isdir(dest) or not os.path.isfile(os.path.join(venv, "pyvenv.cfg")):
            return False
        upper = os.path.join(self.root, "usrbin", "upper")
        installed = [f"{name}\n" for name in sorted(os.listdir(upper))
                     if re.fullmatch(r"python3\.\d+", name)
                     and os.path.isfile(os.path.join(upper, name))]
        tmp = f"{dest}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        subprocess.run(["cp", "-a", venv, os.path.join(tmp, "venv")], check=True)
        with open(os.path.join(tmp, "pythons"), "w") as fobj:  # what dnf installed
            fobj.writelines(installed)
        try:
            os.rename(tmp, dest)
        except OSError:  # another instance kept one first
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        return True
