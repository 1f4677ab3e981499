"""The storage room: one interface for S3 and local folders (against moto's S3 server
over HTTP on loopback), files written whole, streamed reads that resume, the background
uploader, and inputs downloaded once into the cache."""

from __future__ import annotations

import logging
import threading
import time
from functools import partial
from pathlib import Path

import boto3
import pytest

from finetune.api.training import TrainingSpec
from finetune.trainer.errors import AccessDenied, JobInputError, Unreachable
from finetune.trainer.evaluation.sources import resolve_evaluators
from finetune.trainer.storage.files import written_whole
from finetune.trainer.storage.inputs import download_prefix, drop_deleted, local_folder
from finetune.trainer.storage.local import LocalStore
from finetune.trainer.storage.retries import RETRY_FOR_ENV
from finetune.trainer.storage.s3 import ResumableRead, S3Settings
from finetune.trainer.storage.store import Store, open_store
from finetune.trainer.storage.uploader import Task, Uploader
from tests.support import lora_job
from tests.trainer.s3faults import Moto, moto  # noqa: F401 - the fixture


def roundtrip(store: Store, tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    source = tmp_path / "source.bin"
    source.write_bytes(b"weights" * 1000)
    store.put_file(source, "a/b.bin")
    store.write_text("a/note.txt", "hello")
    assert dict(store.keys("a/")) == {"a/b.bin": 7000, "a/note.txt": 5}
    assert store.read_text("a/note.txt") == "hello"
    assert store.read_text("a/missing.txt") is None
    store.get_file("a/b.bin", tmp_path / "copy" / "b.bin")
    assert (tmp_path / "copy" / "b.bin").read_bytes() == source.read_bytes()
    store.delete(["a/b.bin"])
    assert dict(store.keys()) == {"a/note.txt": 5}


@pytest.mark.slow  # starts moto's S3 server
def test_s3_and_local_stores_behave_alike(moto: Moto, tmp_path: Path) -> None:  # noqa: F811
    roundtrip(moto.store(), tmp_path / "s3")
    roundtrip(LocalStore(tmp_path / "folder"), tmp_path / "local")


@pytest.mark.slow  # starts moto's S3 server
def test_wrong_credentials_fail_at_once_without_retrying(
    moto: Moto,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from moto import settings

    store = moto.store()
    # From now on moto checks signatures against its IAM users: the key is unknown.
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    path = tmp_path / "f"
    path.write_bytes(b"x")
    started = time.monotonic()
    with pytest.raises(AccessDenied, match=r"s3://runs/job/f: S3 refused the request \(\w+\)"):
        store.put_file(path, "f")
    with pytest.raises(AccessDenied):
        store.read_text("f")
    assert time.monotonic() - started < 5


@pytest.mark.slow  # starts moto's S3 server
def test_an_outage_is_ridden_out(moto: Moto, tmp_path: Path) -> None:  # noqa: F811
    store = moto.store()
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1000)
    moto.stop()
    restart = threading.Timer(3.0, moto.start)
    restart.start()
    started = time.monotonic()
    store.put_file(path, "f")  # retried until the server is back
    assert time.monotonic() - started >= 3.0
    assert dict(store.keys()) == {"f": 1000}


def test_uploader_keeps_order_and_hands_over_a_refusal(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    uploader = Uploader(store)
    done: list[int] = []
    for step in (1, 2, 3):
        path = tmp_path / f"{step}.bin"
        path.write_bytes(bytes(step))
        uploader.submit(Task(step, [(path, f"{step}.bin")], then=partial(done.append, step)))
    uploader.wait()
    assert done == [1, 2, 3]
    assert uploader.uploaded_through() == 3
    uploader.submit(Task(4, [(tmp_path / "missing.bin", "missing.bin")]))
    with pytest.raises(FileNotFoundError):
        uploader.wait()
    with pytest.raises(FileNotFoundError):
        uploader.submit(Task(5))
    assert uploader.uploaded_through() == 3
    uploader.close()


@pytest.mark.slow  # starts moto's S3 server
def test_inputs_are_downloaded_once_and_checked(moto: Moto, tmp_path: Path) -> None:  # noqa: F811
    client = boto3.client("s3", endpoint_url=moto.url)
    client.create_bucket(Bucket="data")
    for name in ("a.png", "b.png"):
        client.put_object(Bucket="data", Key=f"discs/{name}", Body=name.encode() * 50)
    settings = S3Settings(moto.url)
    cache = tmp_path / "cache" / "discs"
    download_prefix("s3://data/discs", cache, settings)
    first = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert sorted(first) == ["a.png", "b.png"]
    download_prefix("s3://data/discs", cache, settings)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == first, "downloaded again"

    # A damaged cached file (same size) is noticed once the marker is gone, and replaced.
    (cache / "a.png").write_bytes(b"x" * len(b"a.png" * 50))
    cache.with_name("discs.verified.json").unlink()
    download_prefix("s3://data/discs", cache, settings)
    assert (cache / "a.png").read_bytes() == b"a.png" * 50

    # A photo deleted from the prefix (a bad one, say) leaves the cache too.
    client.put_object(Bucket="data", Key="discs/more/c.png", Body=b"c" * 50)
    download_prefix("s3://data/discs", cache, settings)
    client.delete_objects(
        Bucket="data", Delete={"Objects": [{"Key": "discs/b.png"}, {"Key": "discs/more/c.png"}]}
    )
    download_prefix("s3://data/discs", cache, settings)
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*")) == ["a.png"]


class BreakingBody:
    """An S3 body whose connection drops after `limit` bytes."""

    def __init__(self, data: bytes, limit: int) -> None:
        self.data, self.limit, self.sent = data, limit, 0

    def read(self, size: int | None = None) -> bytes:
        from botocore.exceptions import ResponseStreamingError

        if self.sent >= self.limit:
            raise ResponseStreamingError(error="connection reset by peer")
        end = len(self.data) if size is None else self.sent + size
        chunk = self.data[self.sent : min(end, self.limit)]
        self.sent += len(chunk)
        return chunk

    def close(self) -> None:
        return


class FlakyS3:
    """Stands in for S3Store.body: every connection breaks after 1000 bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offsets: list[int] = []

    def body(self, key: str, offset: int = 0) -> BreakingBody:
        self.offsets.append(offset)
        return BreakingBody(self.data[offset:], 1000)

    def uri_of(self, key: str) -> str:
        return f"s3://bucket/{key}"


def test_an_s3_read_that_breaks_off_resumes_at_the_byte_it_reached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("finetune.trainer.process.stopping.pause", lambda seconds: None)
    data = bytes(range(256)) * 40
    flaky = FlakyS3(data)
    with ResumableRead(flaky, "shard.tar") as stream:  # type: ignore[arg-type]
        assert b"".join(iter(lambda: stream.read(4096), b"")) == data
    assert flaky.offsets[0] == 0
    assert flaky.offsets[1] > 0
    assert flaky.offsets == sorted(flaky.offsets)


def test_a_file_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "weights.bin"
    with written_whole(target) as partial:
        partial.write_bytes(b"new")
    assert target.read_bytes() == b"new"

    def killed_while_writing() -> None:
        with written_whole(target) as partial:
            partial.write_bytes(b"half")
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        killed_while_writing()
    assert target.read_bytes() == b"new", "a failed write left the old file in place"
    assert dict(LocalStore(tmp_path).keys()) == {"sub/weights.bin": 3}, "no .partial listed"


def test_stores_are_chosen_by_scheme_and_local_inputs_stay_where_they_are(
    tmp_path: Path,
) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert local_folder(str(tmp_path), tmp_path / "cache", S3Settings(), "data") == tmp_path
    # Data never comes from the hub (the API refuses hf:// for it): no snapshot is taken.
    assert local_folder("hf://acme/x", tmp_path, S3Settings(), "data") == Path("hf://acme/x")


def test_an_unreachable_hub_names_the_evaluator_field_a_job_left_at_its_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Metrics on with the default evaluators and no hub: the retries and the error name
    `spec.validation.evaluator.clipModel`, which the user never wrote, and where else it
    can point."""
    from huggingface_hub import constants

    spec = TrainingSpec.model_validate(
        lora_job(validation={"prompts": ["a sks dog"], "metrics": ["clipText"]})["spec"]
    )
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv(RETRY_FOR_ENV, "1")
    caplog.set_level(logging.WARNING)
    with pytest.raises(Unreachable) as raised:
        resolve_evaluators(spec, tmp_path, S3Settings())
    field = "spec.validation.evaluator.clipModel (the default): hf://openai/clip-vit-large-patch14"
    assert str(raised.value).startswith(f"{field}: the hub cannot be reached")
    assert str(raised.value).endswith(
        "; or point spec.validation.evaluator.clipModel at a local folder or an s3:// copy"
    )
    assert f"{field}: " in caplog.text  # each retry's warning


def test_a_cache_leaves_a_file_being_written_alone(tmp_path: Path) -> None:
    """A `.partial` file (another run's download into a shared cache) is not stale."""
    for name in ("sub/a.png", "gone.png", "b.png.partial"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    drop_deleted(tmp_path, ["sub/a.png", "c.png"])
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "b.png.partial",
        "sub",
        "sub/a.png",
    ]


@pytest.mark.slow  # starts moto's S3 server
@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("discs//tmp/abs.png", "an object key with an empty, '.' or '..' part"),
        ("discs/sub/../../escaped.png", "an object key with an empty, '.' or '..' part"),
        ("discs/a.png/b.png", "its name is both a file and a folder under the prefix"),
    ],
)
def test_an_object_no_file_can_mirror_is_refused_and_nothing_lands_outside(
    moto: Moto,  # noqa: F811
    tmp_path: Path,
    key: str,
    why: str,
) -> None:
    """A doubled slash (`photos//a.png`) or a `..` in a key would put the file outside
    the cache, or nowhere the folder is read; an object named like a folder, beside it."""
    client = boto3.client("s3", endpoint_url=moto.url)
    client.create_bucket(Bucket="data")
    client.put_object(Bucket="data", Key="discs/a.png", Body=b"a" * 50)
    client.put_object(Bucket="data", Key=key, Body=b"b" * 50)
    cache = tmp_path / "deep" / "cache" / "discs"
    with pytest.raises(JobInputError) as refused:
        download_prefix("s3://data/discs", cache, S3Settings(moto.url))
    assert str(refused.value).startswith(f"s3://data/{key}: {why}")
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert written <= {"deep/cache/discs/a.png", "deep/cache/discs.lock"}, written


def test_a_delete_s3_refuses_key_by_key_is_not_taken_for_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the DeleteObject right, S3 answers DeleteObjects with 200 and lists each
    key it kept under `Errors`; moto cannot refuse that way (it does only for a locked
    version), so botocore's own stubber gives the answer. Taken for done, the write
    probe passed and `keepLast` silently kept every checkpoint."""
    from botocore.stub import Stubber

    from finetune.trainer.storage.s3 import S3Store

    for key, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}.items():
        monkeypatch.setenv(key, value)
    store = S3Store("s3://runs/job", S3Settings("http://127.0.0.1:9"))
    refused = {"Key": "job/checkpoints/step-1/a.bin", "Code": "AccessDenied", "Message": "no"}
    with Stubber(store.client) as stub:
        stub.add_response("delete_objects", {"Errors": [refused]})
        with pytest.raises(
            AccessDenied, match=r"^s3://runs/job/checkpoints/step-1/a.bin: S3 refused"
        ):
            store.delete(["checkpoints/step-1/a.bin", "checkpoints/step-1/b.bin"])
        stub.add_response("delete_objects", {"Deleted": [{"Key": "job/a"}]})
        store.delete(["a"])
        stub.assert_no_pending_responses()


@pytest.mark.slow  # starts moto's S3 server
def test_runs_started_together_take_turns_filling_the_cache(
    moto: Moto,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sweep's runs share the cache: one mirroring a prefix another run is mirroring
    waits for it (they would write the same `.partial` files), then finds it all there."""
    from finetune.trainer.storage.inputs import cache_folder_held

    client = boto3.client("s3", endpoint_url=moto.url)
    client.create_bucket(Bucket="data")
    client.put_object(Bucket="data", Key="discs/a.png", Body=b"a" * 50)
    cache = tmp_path / "cache" / "discs"
    done = threading.Event()

    def second_run() -> None:
        download_prefix("s3://data/discs", cache, S3Settings(moto.url))
        done.set()

    with cache_folder_held(cache, "s3://data/discs"):  # the first run, filling it
        thread = threading.Thread(target=second_run, daemon=True)
        thread.start()
        assert not done.wait(1.5), "the second run did not wait"
        assert not cache.exists() or not any(cache.iterdir())
    assert done.wait(30)
    assert (cache / "a.png").read_bytes() == b"a" * 50
    assert "s3://data/discs: waiting for another run filling the cache with it" in caplog.text
