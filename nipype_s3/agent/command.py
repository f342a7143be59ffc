"""Command templates: ``{input}`` and ``{output_dir}`` reach the command as environment
variables or arguments, never as shell text (pure: no boto3, no network).

EC2ContainerRun's ``command`` is a template written by the user, and the input's file
name comes from an S3 key that someone else may have chosen: ``sub-01_$(touch X).nii.gz``
is a valid key. Pasting that name into shell text, however it is quoted, lets the name
run commands (``"{input}"`` with ``$(...)`` in the name, ``'{input}'`` with a ``'`` in it,
``sh -c '... {input} ...'`` with either). So the name never becomes shell text:

* where a shell reads the template (``runtime="none"``, or the script of ``sh -c`` /
  ``bash -c`` in a container), each placeholder becomes a *reference* to the variable
  holding the path (``NIPYPE_S3_INPUT``, ``NIPYPE_S3_OUTPUT_DIR``), written for the
  quoting it stands in: ``"${NIPYPE_S3_INPUT}"`` bare, ``${NIPYPE_S3_INPUT}`` between
  double quotes, ``'"${NIPYPE_S3_INPUT}"'`` between single quotes; in the script of an
  inner shell the reference is handed on unexpanded, for that shell to expand. A shell
  never parses the result of an expansion again, so the path stays one word whatever
  characters it holds;
* where no shell reads it (a container's command words), the path is the argument
  itself (one argv element, never parsed).

Only the exact texts ``{input}`` and ``{output_dir}`` are placeholders: every other brace
(``awk '{print $1}'``, ``${HOME}``, ``find -exec {} \\;``) stays as written.

Values of ``env`` (licences, tokens) are passed in the process environment only: docker
gets ``-e NAME`` without a value (docker reads the value from its own environment),
apptainer ``APPTAINERENV_NAME`` variables; never an argv element that ``ps`` shows.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

__all__ = ["Command", "INPUT_VAR", "OUTPUT_VAR", "PLACEHOLDERS", "check_env_names",
           "shell_text", "argv_words"]

#: The variable holding the staged input's path (a file, or a folder).
INPUT_VAR = "NIPYPE_S3_INPUT"
#: The variable holding the output folder's path.
OUTPUT_VAR = "NIPYPE_S3_OUTPUT_DIR"
#: The placeholders of a command template, and the variable each one stands for.
PLACEHOLDERS = {"{input}": INPUT_VAR, "{output_dir}": OUTPUT_VAR}

_PLACEHOLDER = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS))
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "posh", "yash"}
_C_FLAG = re.compile(r"-[A-Za-z]*c[A-Za-z]*\Z")  # -c, -lc, -ec, -xc ...
_BREAK = " \t\n;&|()<>"  # characters that end an unquoted word
_EXPANDS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_@*#?$!-{(")


@dataclass(frozen=True)
class Command:
    """What to run: ``argv``, and ``env`` to add to the process environment.

    ``env`` holds the paths and the job's ``env`` values; its values are secrets to be
    kept out of argv and logs, so the ``repr`` shows the names only.
    """

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Command(argv={self.argv!r}, env names={sorted(self.env)!r})"


def check_env_names(env: dict, runtime: str | None = None) -> None:
    """Refuse environment variable names a process could not be given safely.

    With ``runtime="docker"`` the values pass through the ``docker`` command's own
    environment (``-e NAME``), so the names that command reads itself (``DOCKER_*``,
    ``PATH``, ``HOME``, ``LD_*``) are refused too.

    Raises
    ------
    ValueError
        A name is not ``[A-Za-z_][A-Za-z0-9_]*``, is one of the placeholders'
        variables, or one the docker command reads. The message names the variable,
        never its value.
    """
    for name in env:
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise ValueError(
                f"env name {name!r} is not a valid environment variable name: use letters, "
                "digits and '_', not starting with a digit.")
        if name in PLACEHOLDERS.values():
            raise ValueError(
                f"env may not set {name}: it holds the path of "
                f"{'{input}' if name == INPUT_VAR else '{output_dir}'} for the command.")
        if runtime == "docker" and (name in ("PATH", "HOME")
                                    or name.startswith(("DOCKER_", "LD_"))):
            raise ValueError(
                f"env may not set {name} with runtime='docker': the docker command itself "
                "would read it. Set it in the image, or in the command "
                f"(sh -c '{name}=... exec tool ...').")


def argv_words(template: str, values: dict[str, str]) -> list[str]:
    """The command words of a container, from ``template`` (no shell reads them).

    The template is split as a shell would (:func:`shlex.split`); in each word the
    placeholders become the paths in ``values`` (``{variable name: path}``), except in
    the script of a shell (the word after ``-c`` of ``sh``, ``bash``, ...), which gets
    :func:`shell_text` so the shell expands the variables itself.
    """
    words = shlex.split(template)
    out = []
    for n, word in enumerate(words):
        if _is_script(words[:n]):
            out.append(shell_text(word))
        else:
            out.append(_PLACEHOLDER.sub(lambda m: values[PLACEHOLDERS[m.group(0)]], word))
    return out


def shell_text(template: str) -> str:
    """``template`` as shell text in which each placeholder is a variable reference.

    The result holds no path: a shell given the variables (:data:`INPUT_VAR`,
    :data:`OUTPUT_VAR`) in its environment expands them, and never parses what it
    expanded as code.
    """
    return _Scanner(template).commands(0, until="")[0]


def _is_script(before: list) -> bool:
    """Whether the word after ``before`` (the words so far of one command, None for a
    word that is not plain text) is the script of a shell: ``sh -c SCRIPT``."""
    if len(before) < 2 or before[-1] is None or not _C_FLAG.match(before[-1]):
        return False
    return any(w is not None and w.rsplit("/", 1)[-1] in _SHELLS for w in before[:-1])


# one reference per quoting context: the placeholder expands right where it stands ...
_REF = {"bare": '"${%s}"', "double": "${%s}", "single": "'\"${%s}\"'",
        "ansi": "'\"${%s}\"$'"}
# ... or reaches an inner shell's script as "${VAR}", unexpanded
_HANDED_ON = {"bare": "'\"${%s}\"'", "double": '\\"\\${%s}\\"', "single": '"${%s}"',
              "ansi": '"${%s}"'}


class _Scanner:
    """One pass over shell text, copying it with the placeholders rewritten.

    It knows what the rewriting needs and no more: quotes, backslashes, ``$(...)``,
    backquotes, ``${...}``, comments, and where a command ends (to find ``sh -c``).
    """

    def __init__(self, text: str) -> None:
        self.text = text

    def commands(self, i: int, until: str) -> tuple[str, int]:
        """Copy commands from ``i`` up to ``until`` (``")"``, a backquote, or ``""`` for
        the end); return the copy and the index after ``until``."""
        text, out, words, depth = self.text, [], [], 0
        while i < len(text):
            c = text[i]
            if until == "`" and c == "`":
                return "".join(out), i + 1
            if c == ")" and until == ")" and depth == 0:
                return "".join(out), i + 1
            if c in " \t<>":
                out.append(c)
                i += 1
            elif c in "\n;&|()":
                depth += (c == "(") - (c == ")" and depth > 0)
                words = []
                out.append(c)
                i += 1
            elif c == "#" and (i == 0 or text[i - 1] in " \t\n;&|()"):
                end = text.find("\n", i)
                end = len(text) if end < 0 else end
                out.append(text[i:end])
                i = end
            else:
                copied, decoded, i = self._word(i, _is_script(words), until)
                words.append(decoded)
                out.append(copied)
        return "".join(out), i

    def _word(self, i: int, script: bool, until: str) -> tuple[str, str | None, int]:
        """Copy one word; return (its copy, its text when it holds no expansion, next i).

        In an inner shell's script the placeholders are handed on; when the whole script
        is plain text it is rewritten as shell text of its own (so its own quoting is
        respected) and quoted again.
        """
        text = self.text
        here, handed, decoded, plain = [], [], [], True
        found = False

        def put(s: str, d: str | None = None) -> None:
            here.append(s)
            handed.append(s)
            if d is not None:
                decoded.append(d)

        def placeholder(j: int, context: str) -> int:
            nonlocal found
            m = _PLACEHOLDER.match(text, j)
            if not m:
                return j
            found = True
            var = PLACEHOLDERS[m.group(0)]
            here.append(_REF[context] % var)
            handed.append(_HANDED_ON[context] % var)
            decoded.append(m.group(0))
            return m.end()

        while i < len(text):
            c = text[i]
            if c in _BREAK or (until == "`" and c == "`"):
                break
            j = placeholder(i, "bare")
            if j != i:
                i = j
            elif c == "\\":
                put(text[i:i + 2], text[i + 1:i + 2] if text[i + 1:i + 2] != "\n" else "")
                i += 2
            elif c == "'":
                put("'")
                i += 1
                while i < len(text) and text[i] != "'":
                    j = placeholder(i, "single")
                    if j == i:
                        put(text[i], text[i])
                        j = i + 1
                    i = j
                put(text[i:i + 1])
                i += 1
            elif c == "$" and text[i + 1:i + 2] == "'":
                plain = False
                put("$'")
                i += 2
                while i < len(text) and text[i] != "'":
                    j = placeholder(i, "ansi")
                    if j == i:
                        j = i + (2 if text[i] == "\\" else 1)
                        put(text[i:j])
                    i = j
                put(text[i:i + 1])
                i += 1
            elif c == '"':
                put('"')
                i += 1
                while i < len(text) and text[i] != '"':
                    j = placeholder(i, "double")
                    if j != i:
                        i = j
                    elif text[i] == "\\":
                        nxt = text[i + 1:i + 2]
                        put(text[i:i + 2], nxt if nxt in '$`"\\' else
                            "" if nxt == "\n" else text[i:i + 2])
                        i += 2
                    elif text[i] in "$`":
                        plain = False
                        i = self._expansion(i, put)
                    else:
                        put(text[i], text[i])
                        i += 1
                put(text[i:i + 1])
                i += 1
            elif c in "$`" and (c == "`" or text[i + 1:i + 2] in _EXPANDS):
                plain = False
                i = self._expansion(i, put)
            else:
                if c in "*?[" or (c == "~" and not decoded):
                    plain = False  # a glob, or ~: not plain text
                put(c, c)
                i += 1
        if not script or not found:
            return "".join(here), ("".join(decoded) if plain else None), i
        if plain:
            return shlex.quote(shell_text("".join(decoded))), None, i
        return "".join(handed), None, i

    def _expansion(self, i: int, put) -> int:
        """Copy ``$(...)``, a backquoted command, ``${...}`` or ``$NAME`` at ``i``; a
        command substitution is commands of this same shell, rewritten as such."""
        text = self.text
        if text[i] == "`":
            inner, j = self.commands(i + 1, until="`")
            put("`" + inner + "`")
            return j
        if text[i + 1:i + 2] == "(":
            inner, j = self.commands(i + 2, until=")")
            put("$(" + inner + ")")
            return j
        if text[i + 1:i + 2] == "{":
            depth, j = 0, i + 1
            while j < len(text):
                depth += (text[j] == "{") - (text[j] == "}")
                j += 1
                if depth == 0:
                    break
            put(text[i:j])
            return j
        put(text[i:i + 2])
        return i + 2
