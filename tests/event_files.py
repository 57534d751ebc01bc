"""Reading TensorBoard event files the way TensorBoard does, without TensorBoard: TFRecord framing with its
checksums, `Event` protos, and the scalars a reader would show after a resume's purge."""

import struct
from pathlib import Path


def tfrecords(data: bytes) -> tuple[list[bytes], int]:
    """Payloads of a TFRecord file (length, crc, payload, crc) and the bytes they span; reading stops
    at a torn or corrupt record, as TensorBoard's reader does."""
    from tensorboardX.record_writer import masked_crc32c

    payloads, pos = [], 0
    while pos + 12 <= len(data):
        header, header_crc = data[pos:pos + 8], data[pos + 8:pos + 12]
        (length,) = struct.unpack("<Q", header)
        payload, crc = data[pos + 12:pos + 12 + length], data[pos + 12 + length:pos + 16 + length]
        if len(crc) < 4 or [header_crc, crc] != [struct.pack("<I", masked_crc32c(x)) for x in (header, payload)]:
            break
        payloads.append(payload)
        pos += 16 + length
    return payloads, pos


def read_event_file(path: Path) -> list:
    """The `Event` protos of one event file, up to its first torn or corrupt record."""
    from tensorboardX.proto import event_pb2

    return [event_pb2.Event.FromString(payload) for payload in tfrecords(path.read_bytes())[0]]


def effective_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars as TensorBoard's EventAccumulator shows them: files in name order, and a
    `SessionLog.START` at step s (in a file of version >= 2) drops every value with step >= s."""
    from tensorboardX.proto.event_pb2 import SessionLog

    series: dict[str, list[tuple[int, float]]] = {}
    version = 0.0
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in read_event_file(path):
            if event.HasField("file_version"):
                version = float(event.file_version.split("brain.Event:")[-1])
            if version >= 2 and event.HasField("session_log") and event.session_log.status == SessionLog.START:
                series = {tag: [(s, v) for s, v in values if s < event.step] for tag, values in series.items()}
            for value in event.summary.value:
                series.setdefault(value.tag, []).append((event.step, value.simple_value))
    return series
