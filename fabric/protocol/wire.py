"""FBF1 (memory bulk bytes) and worker protocol v1: the Cython codecs of :mod:`fabric_ext.wire`, found here.

Both codecs are C for speed and live in ``fabric_ext`` (which imports nothing of fabric);
this module re-exports them unchanged, so :mod:`fabric.protocol` is the one place to
find every frame codec.  They follow the rules :mod:`.reader` spells for the Python
codecs (checked reads naming the field and its offset, trailing bytes refused; see
docs/protocol.md "Reading a frame").  Importing this module loads the extension.
Part of :mod:`fabric.protocol`.
"""

from __future__ import annotations

from fabric_ext.wire import (
    CONTENT_TYPE,
    DEFAULT_MAX_ITEMS,
    DEFAULT_MAX_PAYLOAD,
    HEADER_SIZE,
    ITEM_FIXED,
    KIND_ACK,
    KIND_DATA,
    KIND_READ,
    KIND_WRITE,
    MAGIC,
    TO_END,
    V1_DEFAULT_MAX_PAYLOAD,
    V1_ERROR,
    V1_HEADER_SIZE,
    V1_MSG_CORE,
    V1_MSG_JOB,
    V1_MSG_VERSION,
    V1_OK,
    V1_VERSION,
    VERSION,
    Frame,
    FrameDecoder,
    V1Decoder,
    V1Frame,
    V1InvalidFrame,
    V1TooLarge,
    decode,
    decode_payloads,
    encode,
    encode_head,
    encode_reads,
    encode_reserve,
    frame_length,
    read_reply_reserve,
    v1_core,
    v1_error,
    v1_frame,
    v1_job,
    v1_job_header,
    v1_job_result,
    v1_job_result_header,
    v1_ok,
    v1_parse,
    v1_parse_core,
    v1_parse_error,
    v1_parse_job,
    v1_parse_job_result,
    v1_parse_version,
    v1_parse_version_reply,
    v1_version,
)

__all__ = [
    "CONTENT_TYPE", "DEFAULT_MAX_ITEMS", "DEFAULT_MAX_PAYLOAD", "HEADER_SIZE", "ITEM_FIXED", "KIND_ACK", "KIND_DATA",
    "KIND_READ", "KIND_WRITE", "MAGIC", "TO_END", "VERSION", "Frame", "FrameDecoder", "decode", "decode_payloads",
    "encode", "encode_head", "encode_reads", "encode_reserve", "frame_length", "read_reply_reserve",
    "V1_DEFAULT_MAX_PAYLOAD", "V1_ERROR", "V1_HEADER_SIZE", "V1_MSG_CORE", "V1_MSG_JOB", "V1_MSG_VERSION", "V1_OK",
    "V1_VERSION", "V1Decoder", "V1Frame", "V1InvalidFrame", "V1TooLarge", "v1_core", "v1_error", "v1_frame",
    "v1_job", "v1_job_header", "v1_job_result", "v1_job_result_header", "v1_ok", "v1_parse", "v1_parse_core",
    "v1_parse_error", "v1_parse_job", "v1_parse_job_result", "v1_parse_version", "v1_parse_version_reply",
    "v1_version",
]
