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
