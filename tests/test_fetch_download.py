"""fetch_model / download_file against a real HTTP server on 127.0.0.1 (never a mock)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from helpers.httpserver import FolderServer, ForwardingProxy, closed_port_url, silent_server

from gpt2tune.errors import Gpt2tuneError
from gpt2tune.fetch.download import (
    OFFICIAL_FILES,
    OFFICIAL_MODELS,
    OPENAI_MODELS,
    _is_official,
    download_file,
    fetch_model,
)
from gpt2tune.fetch.manifest import MANIFEST
from gpt2tune.files import RELEASE_FILES

BIG = "model.ckpt.data-00000-of-00001"
BIG_SIZE = 300_000
FAST = {"progress": False, "backoff": 0.01}  # tiny backoff keeps retry tests quick


@pytest.fixture
def served(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """A server root holding a fake 124M model: random bytes for the checkpoint data."""
    rng = random.Random(1234)
    contents = {name: f"{name} of the tiny test model\n".encode() for name in RELEASE_FILES}
    contents[BIG] = rng.randbytes(BIG_SIZE)
    contents["model.ckpt.meta"] = rng.randbytes(5_000)
    root = tmp_path / "srv"
    (root / "124M").mkdir(parents=True)
    for name, data in contents.items():
        (root / "124M" / name).write_bytes(data)
    return root, contents


def assert_model(folder: Path, contents: dict[str, bytes]) -> None:
    # no .part left; the manifest records what was downloaded (gpt2tune.fetch.manifest)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*RELEASE_FILES, MANIFEST])
    for name, data in contents.items():
        assert (folder / name).read_bytes() == data, name


def test_full_download_is_byte_identical(served, tmp_path):
    root, contents = served
    with FolderServer(root) as server:
        out = fetch_model("124M", server.url, tmp_path / "models", **FAST)
    assert out == tmp_path / "models" / "124M"
    assert_model(out, contents)
    # Each file: one GET, then the byte past its end, which an honest server refuses (416).
    for name, data in contents.items():
        assert [r.range for r in server.requests_for(name)] == [None, f"bytes={len(data)}-"]
    assert [r.method for r in server.requests] == ["GET"] * 2 * len(RELEASE_FILES)


def test_second_call_touches_nothing(served, tmp_path):
    root, contents = served
    with FolderServer(root) as server:
        out = fetch_model("124M", server.url, tmp_path, **FAST)
        stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        server.requests.clear()
        assert fetch_model("124M", server.url, tmp_path, **FAST) == out
        assert server.requests == []
    # Not even a connection attempt: a dead server is fine once the model is complete.
    assert fetch_model("124M", closed_port_url(), tmp_path, retries=0, **FAST) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_files_already_complete_are_skipped(served, tmp_path):
    root, contents = served
    dest = tmp_path / "124M"
    dest.mkdir()
    (dest / "hparams.json").write_bytes(b"kept as is")  # a final name means complete
    (dest / "vocab.bpe.part").write_bytes(contents["vocab.bpe"][:3])
    (dest / "vocab.bpe").write_bytes(contents["vocab.bpe"])  # ...even beside a stray .part
    with FolderServer(root) as server:
        fetch_model("124M", server.url, tmp_path, **FAST)
    assert (dest / "hparams.json").read_bytes() == b"kept as is"
    assert not (dest / "vocab.bpe.part").exists()
    assert server.requests_for("hparams.json") == server.requests_for("vocab.bpe") == []
    assert len(server.requests) == 2 * (len(RELEASE_FILES) - 2)  # a GET and an end probe each


def test_dropped_connection_resumes_with_range(served, tmp_path):
    root, contents = served
    with FolderServer(root, drop_after=100_000) as server:
        out = fetch_model("124M", server.url, tmp_path, **FAST)
    assert_model(out, contents)
    assert [r.range for r in server.requests_for(BIG)] == [None, "bytes=100000-"]


def test_stale_part_from_previous_run_is_resumed(served, tmp_path):
    root, contents = served
    dest = tmp_path / "124M"
    dest.mkdir()
    (dest / (BIG + ".part")).write_bytes(contents[BIG][:123_456])
    with FolderServer(root) as server:
        fetch_model("124M", server.url, tmp_path, **FAST)
    assert_model(dest, contents)
    assert [r.range for r in server.requests_for(BIG)] == ["bytes=123456-"]


def test_part_that_is_already_whole_is_just_renamed(served, tmp_path):
    root, contents = served
    dest = tmp_path / "124M"
    dest.mkdir()
    (dest / (BIG + ".part")).write_bytes(contents[BIG])  # crashed between last byte and rename
    with FolderServer(root) as server:
        fetch_model("124M", server.url, tmp_path, **FAST)
    assert_model(dest, contents)
    assert [r.range for r in server.requests_for(BIG)] == [f"bytes={BIG_SIZE}-"]  # 416


def test_part_longer_than_remote_file_restarts(served, tmp_path):
    root, contents = served
    dest = tmp_path / "124M"
    dest.mkdir()
    (dest / (BIG + ".part")).write_bytes(b"x" * (BIG_SIZE + 10))
    with FolderServer(root) as server:
        fetch_model("124M", server.url, tmp_path, **FAST)
    assert_model(dest, contents)
    ranges = [f"bytes={BIG_SIZE + 10}-", None, f"bytes={BIG_SIZE}-"]
    assert [r.range for r in server.requests_for(BIG)] == ranges


@pytest.mark.parametrize("status", [503, 429, 500])
def test_transient_status_is_retried(served, tmp_path, status):
    root, contents = served
    with FolderServer(root, fail_first=2, fail_status=status, retry_after=0) as server:
        out = fetch_model("124M", server.url, tmp_path, **FAST)
    assert_model(out, contents)
    assert len(server.requests) == 2 + 2 * len(RELEASE_FILES)


def test_persistent_5xx_gives_up_naming_file_and_address(served, tmp_path):
    root, _ = served
    with FolderServer(root, fail_first=10**9, fail_status=502) as server:
        began = time.monotonic()
        with pytest.raises(Gpt2tuneError) as err:
            download_file(f"{server.url}/124M/{BIG}", tmp_path / BIG, retries=3, **FAST)
    msg = str(err.value)
    assert f"could not download {server.url}/124M/{BIG}: HTTP 502" in msg and "4 attempts" in msg
    assert time.monotonic() - began < 5 and "\n" not in msg
    assert len(server.requests) == 4 and not (tmp_path / BIG).exists()


def test_server_ignoring_range_restarts_from_zero(served, tmp_path):
    root, contents = served
    dest = tmp_path / "124M"
    dest.mkdir()
    (dest / (BIG + ".part")).write_bytes(b"garbage that must not survive")
    with FolderServer(root, ignore_range=True, drop_after=50_000) as server:
        fetch_model("124M", server.url, tmp_path, **FAST)
    assert_model(dest, contents)
    # Resumes are asked for, answered with the whole file, and written from byte 0.
    # The end probe gets the whole file again; its Content-Length agrees, so that is accepted.
    ranges = ["bytes=29-", "bytes=50000-", f"bytes={BIG_SIZE}-"]
    assert [r.range for r in server.requests_for(BIG)] == ranges


def test_read_timeout_is_retried(served, tmp_path):
    root, contents = served
    with FolderServer(root, stall=1.0) as server:  # the first GET of a file stalls for 1 s
        url = f"{server.url}/124M/{BIG}"
        out = download_file(url, tmp_path / BIG, read_timeout=0.3, **FAST)
    assert out.read_bytes() == contents[BIG]
    assert [r.range for r in server.requests] == [None, None, f"bytes={BIG_SIZE}-"]


def test_unknown_model_404_names_model_url_and_official_names(served, tmp_path):
    root, _ = served
    with FolderServer(root) as server:
        with pytest.raises(Gpt2tuneError) as err:
            fetch_model("999M", server.url, tmp_path, **FAST)
    msg = str(err.value)
    assert "'999M'" in msg and f"{server.url}/999M/checkpoint" in msg and "404" in msg
    assert all(name in msg for name in OFFICIAL_MODELS)
    assert "\n" not in msg
    assert len(server.requests) == 1  # no retrying a 404


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "", "..", ".", " 124M", "c:x"])
def test_bad_names_are_rejected_before_any_request(served, tmp_path, name):
    root, _ = served
    with FolderServer(root) as server:
        with pytest.raises(Gpt2tuneError, match="plain folder name"):
            fetch_model(name, server.url, tmp_path / "models", **FAST)
    assert server.requests == []
    assert not (tmp_path / "models").exists()


def test_unreachable_server_fails_fast_naming_the_url(tmp_path):
    base = closed_port_url()
    began = time.monotonic()
    with pytest.raises(Gpt2tuneError) as err:
        fetch_model("124M", base, tmp_path, retries=2, connect_timeout=1, **FAST)
    assert time.monotonic() - began < 5
    msg = str(err.value)
    assert f"{base}/124M/checkpoint" in msg and "3 attempts" in msg and "\n" not in msg
    assert list((tmp_path / "124M").glob("*")) == []


def test_silent_server_times_out_naming_the_url(tmp_path):
    with silent_server() as base:
        with pytest.raises(Gpt2tuneError, match="timed out") as err:
            fetch_model("124M", base, tmp_path, retries=1, read_timeout=0.2, **FAST)
    assert f"{base}/124M/checkpoint" in str(err.value)


def test_deadline_bounds_the_retrying(tmp_path):
    began = time.monotonic()
    with pytest.raises(Gpt2tuneError, match="could not download"):
        download_file(
            closed_port_url() + "/f", tmp_path / "f", retries=1000, backoff=0.05, deadline=0.5
        )
    assert time.monotonic() - began < 2


def test_truncated_body_without_recovery_leaves_no_final_file(served, tmp_path):
    root, contents = served
    with FolderServer(root, drop_after=100_000, drop_count=10**9) as server:
        with pytest.raises(Gpt2tuneError) as err:
            fetch_model("124M", server.url, tmp_path, retries=2, **FAST)
    msg = str(err.value)
    assert f"{server.url}/124M/{BIG}" in msg and "100000 bytes kept" in msg
    assert not (tmp_path / "124M" / BIG).exists()
    # What did arrive is kept for a later run to resume.
    assert (tmp_path / "124M" / (BIG + ".part")).read_bytes() == contents[BIG][:100_000]
    assert [r.range for r in server.requests_for(BIG)] == [None] + ["bytes=100000-"] * 3


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_local_folder_as_base_url(served, tmp_path, as_url):
    root, contents = served
    base = root.as_uri() if as_url else str(root)
    out = fetch_model("124M", base, tmp_path / "models", **FAST)
    assert_model(out, contents)
    assert fetch_model("124M", base, tmp_path / "models", **FAST) == out


def test_local_folder_without_the_model(served, tmp_path):
    root, _ = served
    with pytest.raises(Gpt2tuneError) as err:
        fetch_model("355M", str(root), tmp_path / "models", **FAST)
    msg = str(err.value)
    assert "'355M'" in msg and str(root / "355M") in msg
    assert all(name in msg for name in OFFICIAL_MODELS)


# --------------------------------------------------------------------------- lying lengths


@pytest.mark.parametrize("delta", [-1000, 1000], ids=["body-longer", "body-shorter"])
def test_wrong_content_length_is_caught_and_repaired(served, tmp_path, delta):
    root, contents = served
    with FolderServer(root, length_delta=delta) as server:
        out = fetch_model("124M", server.url, tmp_path, **FAST)
    assert_model(out, contents)  # byte-identical all the same
    ranges = [r.range for r in server.requests_for(BIG)]
    if delta < 0:  # the end probe finds more bytes (206), which the next attempt fetches
        cut = BIG_SIZE + delta
        assert ranges == [None, f"bytes={cut}-", f"bytes={cut}-"]
    else:  # the body ends short of its Content-Length: resumed at the true end, which is 416
        assert ranges == [None, f"bytes={BIG_SIZE}-"]


def test_body_longer_than_the_file_is_refused(served, tmp_path):
    root, contents = served
    dest = tmp_path / "f"
    with FolderServer(root, length_delta=-1000) as server:
        # A server whose Range answers say the file is shorter than the body it sent.
        (root / "124M" / BIG).write_bytes(contents[BIG][:-5000])
        server.replace_first = {BIG: contents[BIG]}
        with pytest.raises(Gpt2tuneError, match="sent more than") as err:
            download_file(f"{server.url}/124M/{BIG}", dest, retries=0, **FAST)
    assert f"{server.url}/124M/{BIG}" in str(err.value)
    assert list(tmp_path.glob("f*")) == []  # neither a final file nor a .part


# --------------------------------------------------------------------------- official files


@pytest.fixture
def official_served(tmp_path, official_vocab_dir, served):
    """The fake 124M, with the official encoder.json and vocab.bpe."""
    root, contents = served
    for name in OFFICIAL_FILES:
        contents[name] = (official_vocab_dir / name).read_bytes()
        (root / "124M" / name).write_bytes(contents[name])
    return root, contents


def damaged(data: bytes) -> bytes:
    """Same size, one byte different: what a flaky proxy or disk might deliver."""
    return data[:1000] + bytes([data[1000] ^ 1]) + data[1001:]


def test_official_vocab_damaged_once_is_fetched_again(official_served, tmp_path):
    root, contents = official_served
    first = {"vocab.bpe": damaged(contents["vocab.bpe"])}
    with FolderServer(root, replace_first=first) as server:
        out = fetch_model("124M", server.url, tmp_path, **FAST)
    assert_model(out, contents)
    gets = [r.range for r in server.requests_for("vocab.bpe")]
    size = len(contents["vocab.bpe"])
    assert gets == [None, f"bytes={size}-", None, f"bytes={size}-"]  # twice, from scratch


def test_official_vocab_damaged_twice_is_refused(official_served, tmp_path):
    root, contents = official_served
    (root / "124M" / "encoder.json").write_bytes(damaged(contents["encoder.json"]))
    with FolderServer(root) as server:
        with pytest.raises(Gpt2tuneError) as err:
            fetch_model("124M", server.url, tmp_path, **FAST)
    msg = str(err.value)
    size, digest = OFFICIAL_FILES["encoder.json"]
    assert f"{server.url}/124M/encoder.json is not the official encoder.json" in msg
    assert digest in msg and "downloaded twice" in msg and "\n" not in msg
    assert not (tmp_path / "124M" / "encoder.json").exists()
    assert not (tmp_path / "124M" / "encoder.json.part").exists()
    assert len([r for r in server.requests_for("encoder.json") if r.range is None]) == 2


def test_checksum_applies_to_local_copies_too(official_served, tmp_path):
    root, contents = official_served
    (root / "124M" / "vocab.bpe").write_bytes(damaged(contents["vocab.bpe"]))
    with pytest.raises(Gpt2tuneError, match="is not the official vocab.bpe"):
        fetch_model("124M", str(root), tmp_path / "models", **FAST)
    assert not (tmp_path / "models" / "124M" / "vocab.bpe").exists()


def test_custom_tokenizer_of_another_size_is_not_checked(served, tmp_path):
    root, contents = served  # the fake model's vocab files are tiny, not the official ones
    out = fetch_model("124M", str(root), tmp_path / "models", **FAST)
    assert_model(out, contents)


def test_official_address_rule():
    # From OpenAI's address every vocab file must match, whatever its size.
    assert _is_official(OPENAI_MODELS) and _is_official(OPENAI_MODELS.upper() + "/")
    assert not _is_official("https://mirror.example/gpt-2/models")


# --------------------------------------------------------------------------- proxies


def test_proxy_from_the_environment_is_used(served, tmp_path, monkeypatch):
    root, contents = served
    for var in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with FolderServer(root) as server, ForwardingProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        out = fetch_model("124M", server.url, tmp_path, **FAST)
    assert_model(out, contents)
    assert len(proxy.urls) == len(server.requests) == 2 * len(RELEASE_FILES)
    assert f"{server.url}/124M/checkpoint" in proxy.urls  # absolute URLs: a proxy request
