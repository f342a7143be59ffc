"""The native engine's own pieces, without a server."""

import os


def test_bodies_are_written_in_slices_at_their_offsets(tmp_path, monkeypatch):
    """One ``write`` of a multi-megabyte part costs several times the kernel time of the
    same bytes in 64 KiB writes (measured on a 2-core Linux VM); the engine writes slices."""
    from nipype_s3.s3 import native

    sizes = []
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, off: sizes.append(len(data))
                        or real(fd, data, off))
    part = os.urandom(3 * native._WRITE_SLICE + 123)
    path = tmp_path / "body"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        native._write_at(fd, part, 1000, extra="ignored")  # the CRT's keyword arguments
        native._write_at(fd, b"head", 0)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[:4] == b"head" and data[1000:] == part and len(data) == 1000 + len(part)
    assert max(sizes) == native._WRITE_SLICE and sum(sizes) == len(part) + 4


def test_a_process_forked_after_the_crt_started_keeps_to_botocore(monkeypatch):
    """The CRT is not fork-safe (nipype's MultiProc forks on Linux before Python 3.14):
    a child of a process whose CRT threads ran uses botocore; other children do not."""
    import sys

    import pytest

    from nipype_s3.s3 import native

    if not hasattr(os, "fork") or sys.platform == "win32":
        pytest.skip("no fork here")

    def child_says() -> bool:
        pid = os.fork()
        if pid == 0:  # the child: 0 when the engine would be refused
            os._exit(0 if native.native_engine(object(), "b", max_concurrency=1,
                                               part_size=1) is None
                     and native._crt_state["inherited"] else 1)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) == 0

    monkeypatch.setitem(native._crt_state, "started", True)
    assert child_says() is True
    assert native._crt_state["inherited"] is False  # the parent itself goes on
    monkeypatch.setitem(native._crt_state, "started", False)
    assert child_says() is False


def test_download_targets_are_opened_without_o_trunc_and_come_out_empty(tmp_path,
                                                                        monkeypatch):
    """ext4 (``auto_da_alloc``) starts writing a file back at ``close`` when it was opened
    with ``O_TRUNC``; the engine opens without it and truncates only a non-empty file."""
    from nipype_s3.s3 import native

    flags = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, flag, mode=0o777: flags.append(flag)
                        or real_open(path, flag, mode))
    made_empty = tmp_path / "made-empty"
    made_empty.write_bytes(b"")
    stale = tmp_path / "stale"
    stale.write_bytes(b"x" * 5000)
    for path in (made_empty, stale, tmp_path / "missing"):
        fd = native.open_empty(str(path))
        try:
            os.pwrite(fd, b"new", 0)
        finally:
            os.close(fd)
        assert path.read_bytes() == b"new"
    assert flags and not any(flag & os.O_TRUNC for flag in flags)


_NS = "http://s3.amazonaws.com/doc/2006-03-01/"


def _listing(entries, *, encoded=True, truncated=False, token=None):
    parts = [f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="{_NS}">',
             f"<Name>b</Name><Prefix>p%2F</Prefix><KeyCount>{len(entries)}</KeyCount>"]
    if encoded:
        parts.append("<EncodingType>url</EncodingType>")
    parts.append(f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>")
    if token:
        parts.append(f"<NextContinuationToken>{token}</NextContinuationToken>")
    for key, size in entries:
        parts.append(f"<Contents><Key>{key}</Key><LastModified>2026-01-02T03:04:05.678Z"
                     f"</LastModified><ETag>&quot;0123abcd&quot;</ETag><Size>{size}</Size>"
                     "<StorageClass>STANDARD</StorageClass></Contents>")
    parts.append("</ListBucketResult>")
    return "".join(parts).encode()


def test_a_listing_page_is_parsed_as_botocore_has_it():
    import datetime as dt

    from nipype_s3.s3.native import parse_list_page

    page = parse_list_page(_listing([("p/a+b%C3%BC.nii", 12), ("p/sub/c%20d", 0)],
                                    truncated=True, token="tok/1=="))
    when = dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.timezone.utc)
    assert page == {"objects": [("p/a bü.nii", 12, "0123abcd", when),
                                ("p/sub/c d", 0, "0123abcd", when)],
                    "truncated": True, "token": "tok/1=="}
    # a server that ignored encoding-type=url: keys as they are
    raw = parse_list_page(_listing([("p/a+b", 1)], encoded=False))
    assert raw["objects"][0][0] == "p/a+b" and raw["token"] is None
    assert raw["truncated"] is False


def test_what_is_not_a_listing_is_refused():
    import pytest

    from nipype_s3.s3.native import parse_list_page

    with pytest.raises(ValueError, match="not a listing"):
        parse_list_page(b"<Error><Code>AccessDenied</Code></Error>")
    with pytest.raises(ValueError, match="not an XML answer"):
        parse_list_page(b"<html><body>proxy says hello")
    with pytest.raises(ValueError, match="without a key"):
        parse_list_page(_listing([]).replace(
            b"</ListBucketResult>", b"<Contents><Size>1</Size></Contents></ListBucketResult>"))


def test_large_targets_have_their_blocks_reserved_but_keep_their_size(tmp_path):
    """Blocks reserved with FALLOC_FL_KEEP_SIZE: the size stays what was written, so a
    short body is still caught by the size check."""
    import sys

    from nipype_s3.s3 import native

    size = native._PREALLOCATE_FROM * 2
    fd = native.open_empty(str(tmp_path / "big"), size)
    try:
        st = os.fstat(fd)
        assert st.st_size == 0
        if sys.platform.startswith("linux"):
            assert st.st_blocks * 512 >= size
        os.pwrite(fd, b"short", 0)
    finally:
        os.close(fd)
    assert (tmp_path / "big").read_bytes() == b"short"
    small = native.open_empty(str(tmp_path / "small"), 1000)
    try:
        assert os.fstat(small).st_blocks == 0  # small files: nothing reserved
    finally:
        os.close(small)
