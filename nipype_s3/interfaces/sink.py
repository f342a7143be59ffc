"""S3DataSink: nipype's DataSink, writing to S3 — concurrent, skip-unchanged, encrypted."""

from __future__ import annotations

import os
import posixpath
import re
import shutil
from dataclasses import replace

from nipype.interfaces.base import Str, traits
from nipype.interfaces.base.traits_extension import isdefined
from nipype.interfaces.io import DataSink, DataSinkInputSpec, DataSinkOutputSpec

from ..exceptions import ConfigurationError, InputFileNotFound
from ..layout import as_key, expand_entry, plan_sink
from ..localfs import copy_file, copy_tree, make_folder
from ..s3.delete import delete_keys
from ..s3.listing import common_prefix, list_objects
from ..s3.transfer import TransferSettings
from ..s3.upload import UploadItem, upload_files
from ..s3.uri import is_s3_uri, join_key, parse_s3_uri
from ._base import BucketTrait, S3ConnectionInputSpec, S3InterfaceMixin, iflogger

__all__ = ["S3DataSink"]


class _S3DataSinkInputSpec(DataSinkInputSpec, S3ConnectionInputSpec):
    bucket = BucketTrait(desc="a boto3 Bucket (e.g. made against a mock or a custom endpoint) "
                         "or a bucket name; overrides the bucket named in base_directory")
    encrypt_bucket_keys = traits.Bool(desc="server-side AES-256 encryption of every object")
    kms_key_id = Str(desc="server-side encryption with this KMS key (id, ARN or alias)")
    local_copy = Str(desc="also copy every file below this local folder, in the same layout")
    sync_delete = traits.Bool(
        False, usedefault=True,
        desc="delete the keys this run did not write: below base_directory/container when "
             "container is set, else only beside the files it writes, in the same folders "
             "(a sibling iteration's folder is never touched; an iterated sink whose keys do "
             "not name the iteration is refused)")


class S3DataSink(S3InterfaceMixin, DataSink):
    """Store results in S3 with nipype's DataSink layout.

    A drop-in for :class:`nipype.interfaces.io.DataSink`: the same inputs, and for any
    inputs the keys below ``s3://bucket/prefix`` are exactly the relative paths
    DataSink writes below a local ``base_directory``. A local ``base_directory`` works
    as with DataSink.

    Unlike DataSink, files go up concurrently; keys that already hold the same bytes
    are skipped after one LIST (large multipart files too); a missing input file or an
    S3 failure is an error, never a silent fallback to a local folder.

    Examples
    --------
    >>> from nipype_s3 import S3DataSink
    >>> sink = S3DataSink(base_directory='s3://mybucket/path/to/output/dir')
    >>> sink.inputs.container = 'sub001'
    >>> sink.inputs.motion = ['realigned_file1.nii.gz']  # doctest: +SKIP
    >>> # -> s3://mybucket/path/to/output/dir/sub001/motion/realigned_file1.nii.gz
    """

    input_spec = _S3DataSinkInputSpec
    output_spec = DataSinkOutputSpec

    def _outputs_to_sink(self) -> dict:
        return {key: value for key, value in self.inputs._outputs.items()
                if isdefined(value)}

    def _layout_kwargs(self) -> dict:
        inputs = self.inputs
        return dict(
            container=inputs.container if isdefined(inputs.container) else None,
            parameterization=bool(inputs.parameterization),
            strip_dir=inputs.strip_dir if isdefined(inputs.strip_dir) else None,
            substitutions=inputs.substitutions if isdefined(inputs.substitutions) else (),
            regexp_substitutions=(inputs.regexp_substitutions
                                  if isdefined(inputs.regexp_substitutions) else ()),
        )

    def _check_sources(self, entries) -> None:
        for entry in entries:
            if not os.path.exists(entry.source):
                raise InputFileNotFound(
                    f"S3DataSink input {entry.input_name!r} names {entry.source!r}, which "
                    "does not exist. Check what is connected to that input (nipype's DataSink "
                    "would skip it silently; S3DataSink refuses so nothing is lost unseen).")

    def _nipype_s3_writes_local_files(self) -> bool:
        """For the remote plugins: a local ``base_directory`` or ``local_copy`` keeps it
        on the controller."""
        base = self.inputs.base_directory
        return isdefined(self.inputs.local_copy) or not (
            isdefined(base) and str(base).lower().startswith("s3://"))

    def _list_outputs(self):
        base = self.inputs.base_directory
        if isdefined(base) and _looks_like_s3(base) and not is_s3_uri(base):
            parse_s3_uri(base)  # raises, saying how the URI is malformed
        if not (isdefined(base) and is_s3_uri(base)):
            if self._opt("bucket") is not None:
                raise ConfigurationError(
                    f"S3DataSink has a bucket override but base_directory is "
                    f"{base if isdefined(base) else None!r}, not an s3:// URI. Set "
                    "base_directory='s3://BUCKET/prefix' (the bucket input then replaces "
                    "BUCKET).")
            outputs = self._outputs_to_sink()
            root = os.path.abspath(base if isdefined(base) else ".")
            entries = plan_sink(outputs, root=root, join=os.path.join,
                                **self._layout_kwargs())
            self._check_sources(entries)
            _refuse_clashes([pair for e in entries for pair in expand_entry(e, os.path.join)],
                            "path")
            return super()._list_outputs()
        return self._sink_to_s3(parse_s3_uri(base))

    def _sink_to_s3(self, uri):
        bucket = uri.bucket
        ref = self._opt("bucket")
        if ref is not None and ref.name != bucket:
            iflogger.warning(
                "S3DataSink: the bucket input %r overrides bucket %r named in base_directory "
                "%s; writing to s3://%s/%s", ref.name, bucket, uri, ref.name, uri.key)
            bucket = ref.name
        layout = self._layout_kwargs()
        entries = [replace(e, dest=as_key(e.dest)) for e in plan_sink(
            self._outputs_to_sink(), root=uri.key.strip("/"), join=posixpath.join, **layout)]
        self._check_sources(entries)

        items = []
        for entry in entries:
            items.extend(UploadItem(src, key) for src, key in expand_entry(entry))
        keys = [i.key for i in items]
        _refuse_clashes([(i.source, i.key) for i in items], "key")

        if isdefined(self.inputs.local_copy):  # a folder that cannot be: said before uploading
            make_folder(os.path.abspath(self.inputs.local_copy), purpose="copy files into",
                        instead="set local_copy to another folder")
        client = self._s3_client(bucket)
        settings = TransferSettings(max_concurrency=self.inputs.max_concurrency,
                                    progress=bool(self.inputs.progress))
        root = join_key(uri.key.strip("/"), layout["container"] or "")
        scope = (root.rstrip("/") + "/") if root else ""
        sync = bool(self.inputs.sync_delete)
        if sync and not scope:
            raise ConfigurationError(
                f"S3DataSink sync_delete=True with base_directory {str(uri)!r} and no container "
                "would delete every other key in the bucket. Give base_directory a key prefix "
                "or set container.")
        if sync and not layout["container"]:
            # no container of its own: deletion stays in the folders this sink writes
            # into, so that a sibling iteration's folder is never touched
            _refuse_shared_iteration_folders(keys, os.getcwd(), str(uri))
            scope = None
        dir_prefixes = [e.dest.rstrip("/") + "/" for e in entries
                        if e.is_dir and self.inputs.remove_dest_dir]
        list_prefix = scope if sync and scope else common_prefix(keys + dir_prefixes)
        existing = list_objects(client, bucket, list_prefix) if (keys or sync) else {}

        encrypt = bool(self.inputs.encrypt_bucket_keys) if isdefined(
            self.inputs.encrypt_bucket_keys) else False
        kms = self._opt("kms_key_id")
        summary = upload_files(
            client, bucket, items, settings=settings, existing=existing,
            sse=None if kms else ("AES256" if encrypt else None), kms_key_id=kms,
            target=f"to s3://{bucket}/{list_prefix}")

        written = set(keys)
        stale = set()
        if sync:
            if scope is not None:  # below the container, as it was asked
                stale |= {k for k in existing if k.startswith(scope) and k not in written}
            else:  # the files beside those it wrote, in the same folders, alone
                folders = {posixpath.dirname(k) for k in keys}
                stale |= {k for k in existing
                          if k not in written and posixpath.dirname(k) in folders}
        for prefix in dir_prefixes:
            stale |= {k for k in existing if k.startswith(prefix) and k not in written}
        if stale:
            summary.deleted = delete_keys(client, bucket, stale)
        iflogger.info("S3DataSink: %s", summary.line())

        out_files = []
        local_root = None
        if isdefined(self.inputs.local_copy):
            local_root = os.path.abspath(self.inputs.local_copy)
            local_entries = plan_sink(self._outputs_to_sink(), root=local_root,
                                      join=os.path.join, **layout)
        for idx, entry in enumerate(entries):
            out_files.append(f"s3://{bucket}/{entry.dest}")
            if local_root is not None:
                out_files.append(_copy_local(local_entries[idx],
                                             bool(self.inputs.remove_dest_dir)))
        outputs = self.output_spec().get()
        outputs["out_file"] = out_files
        return outputs


def _refuse_clashes(pairs, what: str) -> None:
    """Two source files to one destination: an error naming both (nipype's DataSink
    keeps the last one silently; both modes of ours refuse, the same way)."""
    seen: dict[str, str] = {}
    for source, dest in pairs:
        if dest in seen and seen[dest] != source:
            raise ConfigurationError(
                f"S3DataSink would write two files to the same {what} {dest!r}: "
                f"{[seen[dest], source]}. Use different input names, parameterization, or "
                "substitutions to tell them apart.")
        seen[dest] = source


_ITERATION = re.compile(r"_[A-Za-z][A-Za-z0-9]*_.+")


def _refuse_shared_iteration_folders(keys: list[str], node_dir: str, base: str) -> None:
    """``sync_delete`` in a sink that runs once per iteration (its node folder is below
    ``_subject_id_sub-01``) whose keys do not name the iteration: the iterations write
    into one folder, and each would delete what the others wrote."""
    folders = [part for part in node_dir.split(os.sep) if _ITERATION.fullmatch(part)]
    if not folders or not keys:
        return
    named = [f for f in folders if all(f"/{f}/" in f"/{k}" for k in keys)]
    if named:
        return
    raise ConfigurationError(
        f"S3DataSink sync_delete=True runs once per iteration ({folders[-1]}) but writes "
        f"its files below {base} without it in their keys (e.g. {keys[0]!r}): each "
        "iteration would delete the files the others wrote. Connect the iterated value "
        "to container (wf.connect(info, 'subject_id', sink, 'container')), or, for files "
        "made by nodes of the iteration, keep parameterization=True (the iteration "
        "becomes a folder of its own); or set sync_delete=False.")


def _looks_like_s3(value: str) -> bool:
    """A value meant as an S3 location, even a malformed one ('s3:/b', 's3a://b')."""
    low = value.lower()
    return low.startswith(("s3:", "s3a:", "s3n:"))


def _copy_local(entry, remove_dest_dir: bool) -> str:
    make_folder(os.path.dirname(entry.dest) or ".", purpose="copy files into",
                instead="set local_copy to another folder")
    if entry.is_dir:
        if remove_dest_dir and os.path.exists(entry.dest):
            shutil.rmtree(entry.dest)
        return copy_tree(entry.source, entry.dest)
    return copy_file(entry.source, entry.dest)
