"""S3DataGrabber: nipype's S3 grabber on boto3 — glob templates, one LIST, concurrent, cached."""

from __future__ import annotations

import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    DynamicTraitedSpec,
    Str,
    traits,
)
from nipype.interfaces.base.traits_extension import Undefined, isdefined
from nipype.interfaces.io import IOBase, add_traits
from nipype.utils.filemanip import simplify_list
from nipype.utils.misc import human_order_sorted

from ..exceptions import ConfigurationError, S3AccessDenied, S3ObjectNotFound
from ..localfs import confine
from ..s3.download import DownloadItem, download_files
from ..s3.listing import list_objects
from ..s3.transfer import TransferSettings
from ..s3.uri import is_s3_uri, parse_s3_uri, validate_bucket_name
from ..templates import compile_template, covering_prefixes, fill_template, literal_prefix
from ._base import S3ConnectionInputSpec, S3InterfaceMixin, iflogger

__all__ = ["S3DataGrabber"]


def _bucket_name(value: str) -> str:
    """The grabber's ``bucket`` input as a bucket name; ``s3://name`` is taken as ``name``.

    ``s3://name/some/prefix`` is refused with the two inputs it should have been: which
    part is the bucket path is then for the user to say, not for us to guess.
    """
    if not is_s3_uri(value):
        return validate_bucket_name(value)
    uri = parse_s3_uri(value)
    if uri.key.strip("/"):
        raise ConfigurationError(
            f"S3DataGrabber input 'bucket' is {value!r}, a bucket and a key prefix: give the "
            f"bucket alone (bucket={uri.bucket!r}) and the prefix as bucket_path "
            f"(bucket_path={uri.prefix!r}).")
    return uri.bucket


class _S3DataGrabberInputSpec(DynamicTraitedSpec, S3ConnectionInputSpec,
                              BaseInterfaceInputSpec):
    bucket = Str(mandatory=True, desc="the S3 bucket holding the data: its name ('s3://name' "
                                      "is accepted too)")
    bucket_path = Str("", usedefault=True,
                      desc="key prefix below which templates are matched (may be empty)")
    local_directory = Directory(
        desc="where files are downloaded, as local_directory/<key below bucket_path>; "
             "default: the node's working directory")
    template = Str(mandatory=True,
                   desc="layout of the files below bucket_path, e.g. '%s/anat/%s_T1w.nii.gz'")
    template_type = traits.Enum(
        "glob", "regex", usedefault=True,
        desc="'glob' (as nipype's DataGrabber: *, ?, [...] within one folder level) or "
             "'regex' (a regular expression matching the whole key below bucket_path, as "
             "nipype's old S3DataGrabber)")
    template_args = traits.Dict(key_trait=Str, value_trait=traits.List(traits.List),
                                desc="arguments filled into the templates, per output")
    raise_on_empty = traits.Bool(True, usedefault=True,
                                 desc="raise when a template matches nothing")
    drop_blank_outputs = traits.Bool(False, usedefault=True,
                                     desc="drop the empty entries of an output list")
    sort_filelist = traits.Bool(True, usedefault=True,
                                desc="sort matches in human order (sub-2 before sub-10)")
    requester_pays = traits.Bool(False, usedefault=True,
                                 desc="the bucket is requester-pays: you pay for the transfer")


class S3DataGrabber(S3InterfaceMixin, IOBase):
    """Fetch files from S3 by template, as nipype's ``S3DataGrabber``, on boto3.

    Outputs are local paths: a single path when one file matches, a list otherwise.

    Examples
    --------
    >>> from nipype_s3 import S3DataGrabber
    >>> grab = S3DataGrabber(infields=['subject_id'], outfields=['func', 'anat'])
    >>> grab.inputs.bucket = 'openneuro.org'
    >>> grab.inputs.bucket_path = 'ds000101/'
    >>> grab.inputs.anon = True
    >>> grab.inputs.template = '*'
    >>> grab.inputs.field_template = {'anat': '%s/anat/%s_T1w.nii.gz',
    ...                               'func': '%s/func/%s_task-simon_run-*_bold.nii.gz'}
    >>> grab.inputs.template_args = {'anat': [['subject_id', 'subject_id']],
    ...                              'func': [['subject_id', 'subject_id']]}
    >>> grab.inputs.subject_id = 'sub-01'
    >>> grab.run()  # doctest: +SKIP
    """

    input_spec = _S3DataGrabberInputSpec
    output_spec = DynamicTraitedSpec
    _always_run = True

    def __init__(self, infields=None, outfields=None, **kwargs):
        if not outfields:
            outfields = ["outfiles"]
        super().__init__(**kwargs)
        undefined = {}
        self._infields = infields
        self._outfields = outfields
        self._results = None
        for key in infields or ():
            self.inputs.add_trait(key, traits.Any)
            undefined[key] = Undefined
        self.inputs.add_trait("field_template", traits.Dict(
            traits.Enum(outfields), desc="a template per output, instead of 'template'"))
        undefined["field_template"] = Undefined
        if not isdefined(self.inputs.template_args):
            self.inputs.template_args = {}
        for key in outfields:
            if key not in self.inputs.template_args:
                self.inputs.template_args[key] = [infields] if infields else []
        self.inputs.trait_set(trait_change_notify=False, **undefined)

    def _add_output_traits(self, base):
        return add_traits(base, list(self.inputs.template_args.keys()))

    # -- planning: which keys, listed how ----------------------------------------------
    def _bucket_path(self) -> str:
        path = (self.inputs.bucket_path or "").lstrip("/")
        return path.rstrip("/") + "/" if path.strip("/") else ""

    def _field_patterns(self):
        """``{field: [filled pattern per argument tuple]}`` (``None``: no arguments)."""
        mode = self.inputs.template_type
        field_templates = self.inputs.field_template if isdefined(
            self.inputs.field_template) else {}
        patterns = {}
        for field, args in self.inputs.template_args.items():
            template = field_templates.get(field, self.inputs.template).lstrip("/")
            if not args:
                patterns[field] = None, [template]
                continue
            filled = []
            for arglist in args:
                # as in nipype: a string naming an input stands for that input's value
                values = [getattr(self.inputs, a) if isinstance(a, str) and
                          hasattr(self.inputs, a) else a for a in arglist]
                lengths = {len(v) for v in values if isinstance(v, list)}
                if len(lengths) > 1:
                    raise ConfigurationError(
                        f"S3DataGrabber output {field!r}: the list arguments {arglist} have "
                        f"different lengths {sorted(lengths)}; give lists of equal length.")
                count = lengths.pop() if lengths else 1
                for i in range(count):
                    argtuple = [v[i] if isinstance(v, list) else v for v in values]
                    filled.append(fill_template(template, argtuple, mode))
            patterns[field] = args, filled
        return patterns

    def _run_interface(self, runtime):
        for key in self._infields or ():
            if not isdefined(getattr(self.inputs, key)):
                raise ConfigurationError(
                    f"S3DataGrabber requires a value for input {key!r} because it was listed "
                    "in 'infields'.")
        bucket = _bucket_name(self.inputs.bucket)
        mode = self.inputs.template_type
        base = self._bucket_path()
        patterns = self._field_patterns()
        prefixes = covering_prefixes(base + literal_prefix(p, mode)
                                     for _, pats in patterns.values() for p in pats)
        client = self._s3_client(bucket)
        listing = {}
        anon = bool(self.inputs.anon)
        for prefix in prefixes:
            try:
                listing.update(list_objects(client, bucket, prefix,
                                            request_payer=bool(self.inputs.requester_pays)))
            except S3AccessDenied as exc:
                if anon:
                    raise S3AccessDenied(
                        f"Anonymous access to s3://{bucket}/{prefix} was refused: the bucket "
                        "is not public. Drop anon=True and give credentials (creds_path, "
                        "profile or the environment).", bucket=bucket, key=prefix,
                        code=exc.code) from exc
                raise
        relkeys = sorted(k[len(base):] for k in listing if k.startswith(base)
                         and not k.endswith("/"))

        local_dir = os.path.abspath(self.inputs.local_directory if isdefined(
            self.inputs.local_directory) else runtime.cwd)
        wanted: dict[str, DownloadItem] = {}
        results = {}
        for field, (args, pats) in patterns.items():
            found = []
            for pattern in pats:
                match = compile_template(pattern, mode)
                keys = [k for k in relkeys if match(k)]
                if not keys:
                    listed = ", ".join(f"s3://{bucket}/{p}" for p in prefixes)
                    msg = (f"S3DataGrabber output {field!r}: template {pattern!r} "
                           f"({mode}) matched no key below s3://{bucket}/{base} (listed "
                           f"{listed}).")
                    if self.inputs.raise_on_empty:
                        raise S3ObjectNotFound(
                            msg + " Check the template, template_args and bucket_path, or "
                            "set raise_on_empty=False.", bucket=bucket, key=base + pattern)
                    iflogger.warning("%s", msg)
                    found.append(None)
                    continue
                if self.inputs.sort_filelist:
                    keys = human_order_sorted(keys)
                paths = []
                for rel in keys:
                    info = listing[base + rel]
                    # a key with '..' or empty segments (S3 stores them) is refused,
                    # naming it, rather than written outside local_dir
                    dest = confine(local_dir, rel, what=f"S3 key s3://{bucket}/{base}{rel}")
                    wanted[dest] = DownloadItem(base + rel, dest, info.size, info.etag,
                                                info.last_modified)
                    paths.append(dest)
                found.append(simplify_list(paths))
            if args is None:
                value = found[0]
            elif self.inputs.drop_blank_outputs:
                found = [f for f in found if f is not None]
                value = found if found else None
            else:
                value = None if any(f is None for f in found) else found
            if isinstance(value, list):
                value = None if not value else (value[0] if len(value) == 1 else value)
            results[field] = value if value is not None else Undefined

        settings = TransferSettings(max_concurrency=self.inputs.max_concurrency,
                                    progress=bool(self.inputs.progress))
        summary = download_files(client, bucket, list(wanted.values()), settings=settings,
                                 request_payer=bool(self.inputs.requester_pays),
                                 target=f"from s3://{bucket}/{base}")
        iflogger.info("S3DataGrabber: %s", summary.line())
        self._results = results
        return runtime

    def _nipype_s3_writes_local_files(self) -> bool:
        """For the remote plugins: with a ``local_directory`` it runs on the controller."""
        return isdefined(self.inputs.local_directory)

    def _list_outputs(self):
        return dict(self._results or {})

