"""Bundles are written into a new version directory and swapped in with one atomic link; serve verifies them."""

import json

import pytest

from distill.deploy.bundle_files import (
    MANIFEST,
    BundleError,
    new_version,
    publish,
    seal,
    verify,
    versions_dir,
    write_file,
)


def _version(link, text):
    v = new_version(link)
    write_file(v / "model.onnx", text.encode())
    write_file(v / "classes.json", json.dumps(["a", text]))
    seal(v, {"stage": text})
    return v


def test_a_new_version_is_invisible_until_published(tmp_path):
    """Issue 21.17: deploy used to rewrite the bundle in place; a reader now sees the old bundle or the new one."""
    link = tmp_path / "bundle"
    v1 = _version(link, "one")
    publish(link, v1)
    assert link.is_symlink() and (link / "model.onnx").read_text() == "one"
    v2 = new_version(link)
    write_file(v2 / "model.onnx", b"two")  # half-written next version: nothing of it shows through the link
    assert (link / "model.onnx").read_text() == "one"
    assert verify(link)[1]["stage"] == "one"
    write_file(v2 / "classes.json", json.dumps(["a", "two"]))
    seal(v2, {"stage": "two"})
    publish(link, v2)
    root, manifest = verify(link)
    assert root == v2.resolve() and manifest["stage"] == "two" and (link / "model.onnx").read_text() == "two"
    assert verify(v1)[1]["stage"] == "one"  # the previous version is kept, intact, for servers still on it
    assert not str(link.readlink()).startswith("/")  # relative: the bundle and its versions move together


def test_old_versions_are_pruned_and_unsealed_leftovers_removed(tmp_path):
    link = tmp_path / "bundle"
    leftover = new_version(link)  # a deploy killed before it sealed its version
    versions = []
    for i in range(4):
        versions.append(_version(link, str(i)))
        publish(link, versions[-1], keep=2)
    in_progress = new_version(link)  # another deploy, still writing: newer than the current one, never removed
    publish(link, versions[-1], keep=2)
    left = sorted(p.name for p in versions_dir(link).iterdir())
    assert left == [versions[-2].name, versions[-1].name, in_progress.name] and not leftover.exists()


def test_a_pre_versioning_bundle_directory_is_replaced(tmp_path):
    link = tmp_path / "bundle"
    link.mkdir()
    (link / "model.onnx").write_text("legacy")
    v = _version(link, "new")
    publish(link, v)
    assert link.is_symlink() and (link / "model.onnx").read_text() == "new"


def test_verify_names_the_file_that_differs(tmp_path):
    link = tmp_path / "bundle"
    publish(link, _version(link, "one"))
    (link / "model.onnx").write_text("tampered")
    with pytest.raises(BundleError, match=r"model\.onnx: SHA-256 .* does not match bundle\.json .*distill deploy"):
        verify(link)
    (link / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"model\.onnx is listed in bundle\.json but missing"):
        verify(link)
    (link / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match=r"bundle\.json is not a valid bundle manifest"):
        verify(link)
    (link / MANIFEST).unlink()
    with pytest.raises(BundleError, match=r"bundle\.json missing"):
        verify(link)


def test_a_version_a_server_holds_stays_beyond_keep_versions(tmp_path):
    """Issue 30: `deploy.keep_versions` removed the oldest version even while `distill serve` held it. A server
    holds its version with a shared flock on `.in-use` (what `pin` takes); a deploy removes it only once no
    server holds it."""
    import fcntl
    import os

    from distill.deploy.bundle_files import pin

    link = tmp_path / "bundle"
    served = _version(link, "served")
    publish(link, served)
    fd = os.open(served / ".in-use", os.O_RDWR | os.O_CREAT)  # a server (another process) serving it
    fcntl.flock(fd, fcntl.LOCK_SH)
    for i in range(3):
        publish(link, _version(link, str(i)), keep=2)
    assert served.exists() and verify(served)[1]["stage"] == "served"
    os.close(fd)  # that server stopped
    publish(link, _version(link, "next"), keep=2)
    assert not served.exists()
    root, manifest = pin(link)  # what `distill serve` and its replicas do
    for i in range(3):
        publish(link, _version(link, f"later{i}"), keep=2)
    assert root.exists() and manifest["stage"] == "next"


def test_bundle_json_is_strict_json_and_bundles_with_nan_still_verify(tmp_path):
    """Issue 30: a bundle without an int8 ONNX model wrote `"int8_agreement": NaN`, which strict JSON parsers
    reject. Now null; a bundle of an older build (NaN in it) still verifies."""
    link = tmp_path / "bundle"
    v = new_version(link)
    write_file(v / "model.onnx", b"m")
    seal(v, {"parity": {"int8_agreement": float("nan"), "top1_agreement": 1.0}, "litert": {"x": float("inf")}})
    text = (v / MANIFEST).read_text()

    def strict(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    manifest = json.loads(text, parse_constant=strict)  # what a strict parser (JavaScript, Go, jq) does
    assert manifest["parity"]["int8_agreement"] is None and manifest["litert"]["x"] is None
    old = json.loads(text)
    old["parity"]["int8_agreement"] = float("nan")
    (v / MANIFEST).write_text(json.dumps(old))  # as older builds wrote it
    assert "NaN" in (v / MANIFEST).read_text()
    assert verify(v)[1]["parity"]["top1_agreement"] == 1.0
