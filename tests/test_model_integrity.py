"""The stored base model and `kedit edit` directories are checked before use: a damaged file is refused
with its name (predict, export, lineage verify, registration, --edits), never computed with."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from kedit.cli import main
from kedit.lineage import LineageStore, ops
from kedit.models import store as model_store
from kedit.models.store import ModelCorruptError, load_model
from tests.test_lineage import fabricate, gate_and_approve, run_batches, stored_lm  # noqa: F401  (fixture)


def corrupt_values(f: Path, n: int = 1000, keep_mtime: bool = False) -> None:
    """Overwrite ``n`` float32 values of a safetensors file with NaN in place (same size)."""
    st = f.stat()
    header = struct.unpack("<Q", f.read_bytes()[:8])[0]
    with open(f, "r+b") as fh:
        fh.seek(8 + header + 64)
        fh.write(struct.pack("<f", float("nan")) * n)
    if keep_mtime:
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_predict_refuses_a_damaged_base_model_and_names_the_file(workspace, stored_lm, capsys):  # noqa: F811
    stored_lm()  # the first load hashes the files and stamps them
    weights = workspace.model_dir("tiny-llama") / "model.safetensors"
    corrupt_values(weights)
    w = ["-w", str(workspace.root)]
    assert main([*w, "predict", "--model", "tiny-llama", "The Eiffel Tower is in"]) != 0
    err = capsys.readouterr().err
    assert f"{weights}: sha256" in err and "does not match the manifest's" in err and "nan" not in err.lower()
    with pytest.raises(ModelCorruptError, match="model.safetensors"):
        load_model("tiny-llama", workspace)


def test_load_is_cheap_once_stamped_and_full_hash_catches_a_same_mtime_change(workspace, stored_lm,  # noqa: F811
                                                                               monkeypatch):
    stored_lm()
    assert main(["-w", str(workspace.root), "model", "verify", "tiny-llama"]) == 0
    calls = []
    real = model_store.sha256_file
    monkeypatch.setattr(model_store, "sha256_file", lambda p: calls.append(p) or real(p))
    load_model("tiny-llama", workspace)
    assert calls == []  # size, mtime and inode match the stamp: nothing hashed
    weights = workspace.model_dir("tiny-llama") / "model.safetensors"
    corrupt_values(weights, keep_mtime=True)  # bit rot: same size, same mtime, same inode
    load_model("tiny-llama", workspace)  # the cheap check cannot see it ...
    with pytest.raises(ModelCorruptError, match="model.safetensors"):
        load_model("tiny-llama", workspace, verify=True)  # ... the full hash (export, registration) does
    assert main(["-w", str(workspace.root), "model", "verify", "tiny-llama"]) == 1


def test_export_verify_and_registration_refuse_a_damaged_base(workspace, stored_lm, tmp_path, capsys):  # noqa: F811
    lm = stored_lm()
    store = LineageStore(workspace.lineage_dir, snapshot_every=2)
    (s1,) = run_batches(store, lm, 1)
    gate_and_approve(store, s1)
    off = {"mlflow": False, "dvc": False, "snapshot_every": 2, "model_prefix": "kedit", "dvc_remote": None}
    ops.promote(workspace, store, s1.id, by="alice", params=off)
    w = ["-w", str(workspace.root)]
    assert main([*w, "lineage", "verify"]) == 0
    capsys.readouterr()
    weights = workspace.model_dir("tiny-llama") / "model.safetensors"
    corrupt_values(weights, keep_mtime=True)
    assert main([*w, "lineage", "verify"]) == 1
    out = capsys.readouterr().out
    assert f"PROBLEM: {weights.parent}: the stored model's files do not match" in out and f"{weights}: sha256" in out
    assert "lineage OK" not in out
    with pytest.raises(ModelCorruptError, match="model.safetensors"):
        ops.export(workspace, store, s1.id, tmp_path / "served")
    assert not (tmp_path / "served").exists()
    with pytest.raises(ValueError, match="register state .*model.safetensors"):
        ops.register_candidate(workspace, store, s1.id, params=off)


@pytest.fixture
def edit_dir(workspace, stored_lm, tmp_path):  # noqa: F811
    from kedit.editors.io import save_edit

    lm = stored_lm()
    return save_edit(tmp_path / "edit", fabricate(lm, None, 0, ["r1"]), {"method": "alphaedit"})


def test_truncated_edit_dir_is_refused_by_name(workspace, edit_dir, capsys):
    deltas = edit_dir / "deltas.safetensors"
    deltas.write_bytes(deltas.read_bytes()[:100])
    w = ["-w", str(workspace.root)]
    assert main([*w, "predict", "--model", "tiny-llama", "--edits", str(edit_dir), "Paris is"]) != 0
    err = capsys.readouterr().err
    assert f"{deltas}: sha256" in err and "result.json" in err
    # a directory written before the hashes were recorded: the safetensors error, with the file's name
    res = edit_dir / "result.json"
    res.write_text(json.dumps({k: v for k, v in json.loads(res.read_text()).items() if k != "files"}))
    assert main([*w, "predict", "--model", "tiny-llama", "--edits", str(edit_dir), "Paris is"]) != 0
    assert f"{deltas}: not a readable safetensors file" in capsys.readouterr().err


def test_edit_dir_with_changed_values_is_refused(workspace, edit_dir):
    from kedit.editors.io import EditDirError, load_deltas, load_state

    assert load_deltas(edit_dir) and load_state(edit_dir).method
    state = edit_dir / "state.safetensors"
    corrupt_values(state, n=4)
    with pytest.raises(EditDirError, match=f"{state}: sha256"):
        load_state(edit_dir)
    res = edit_dir / "result.json"
    res.write_text(json.dumps({k: v for k, v in json.loads(res.read_text()).items() if k != "files"}))
    with pytest.raises(EditDirError, match="NaN or infinite"):  # unrecorded: the values themselves are checked
        load_state(edit_dir)


def test_a_failed_import_leaves_no_temporary_copy(workspace, tmp_path):
    from kedit.models.store import import_hf
    from tests.conftest import make_tiny_model

    src = tmp_path / "no-tokenizer"
    make_tiny_model("llama").save_pretrained(src)
    with pytest.raises(FileNotFoundError, match="could not load a tokenizer"):
        import_hf(workspace, src, slug="tiny")
    assert list(workspace.models_dir.iterdir()) == []
