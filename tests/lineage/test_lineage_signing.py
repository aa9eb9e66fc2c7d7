"""Per-approver signatures on approve events (issue 38.4, ``lineage.approval_signing: ssh``): a forged
approval chained with kedit's own ``chain.seal`` passed verify and promote. With signing on, an approval
counts only with a good SSH signature by its approver from the workspace's allowed signers file.
Real ssh-keygen, throwaway keys."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from kedit.lineage import LineageStore, ops
from kedit.lineage.chain import seal
from kedit.lineage.policy import PromotionRefused
from kedit.lineage.signing import SigningError, payload, sign, signing_config
from kedit.params import ParamsError

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")


def _key(tmp_path: Path, name: str) -> Path:
    key = tmp_path / "keys" / name
    key.parent.mkdir(exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True)
    return key


def _signing_ws(workspace, tmp_path, monkeypatch, signers: dict[str, Path], extra: str = ""):
    """params.yaml with approval signing on, an allowed signers file listing ``signers`` (name -> key),
    and the store as every command opens it."""
    monkeypatch.delenv("KEDIT_SIGNING_KEY", raising=False)
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "no-gitconfig"))  # no user.signingkey from $HOME
    (workspace.root / "params.yaml").write_text(
        f"lineage: {{approval_signing: ssh, allowed_signers: allowed_signers{extra}}}\n")
    (workspace.root / "allowed_signers").write_text(
        "".join(f"{name} {Path(str(k) + '.pub').read_text()}" for name, k in signers.items()))
    params = {**ops.lineage_params(workspace), "mlflow": False, "dvc": False}
    return params, ops.open_store(workspace, params)


@pytest.fixture
def forged_approval(forge_event):
    """``forged_approval(...)``: _forged_approval writing its events with ``forge_event``."""
    return lambda *a, **k: _forged_approval(*a, **k, forge=forge_event)


def _forged_approval(store: LineageStore, state_id: str, by: str = "alice", signature: dict | None = None, *, forge) -> Path:
    """An approval chained with kedit's public ``seal`` (the attack of case 4e), optionally carrying a signature."""
    chain = store.chain()
    seq = chain.last_seq + 1
    raw = seal({"seq": seq, "type": "approve", "state": state_id, "by": by, "at": "2026-12-07T00:00:00Z",
                "comment": "", "data": {}, "actor": {"identity": by, "os_user": by, "uid": 1000, "host": "h",
                                                     "pid": 1, "configured": False}}, chain.head)
    if signature is not None:
        raw = seal({**raw, "signature": signature}, chain.head)
    return forge(store, f"{seq:06d}-approve.json", raw)


def test_a_chained_forged_approval_counts_with_signing_off(workspace, stored_lm, run_batches,
                                                           forged_approval):
    """Off (the default) keeps the chain's documented limit: a forged approval chained with ``seal``
    counts. This is what the option closes (the next tests)."""
    store = LineageStore(workspace.lineage_dir)
    (s1,) = run_batches(store, stored_lm(), 1)
    store.record_gate(s1.id, {"passed": True}, against=None)
    forged_approval(store, s1.id)
    assert store.verify(deep=False).ok and store.promotion_check(s1.id).ok
    assert not ops.open_store(workspace).signing.on


def test_signed_approval_promotes_and_forgeries_are_refused(workspace, stored_lm, tmp_path, monkeypatch,
                                                            capsys, run_batches, forged_approval,
                                                            forge_event):
    from kedit.cli import main

    alice, mallory = _key(tmp_path, "alice"), _key(tmp_path, "mallory")
    params, store = _signing_ws(workspace, tmp_path, monkeypatch, {"alice": alice})
    s1, s2 = run_batches(store, stored_lm(), 2)
    w = ["-w", str(workspace.root)]

    # a signed approval (through the CLI, key from --key) promotes
    store.record_gate(s1.id, {"passed": True}, against=None)
    assert main([*w, "lineage", "approve", s1.id[:12], "--by", "alice", "--key", str(alice)]) == 0
    (ev,) = [e for e in store.events() if e.type == "approve"]
    assert ev.signature["namespace"] == "kedit-approval" and "BEGIN SSH SIGNATURE" in ev.signature["sig"]
    ops.promote(workspace, store, s1.id, by="bob", params=params)
    assert store.champion() == s1.id and store.verify(deep=False).ok
    real_sig = ev.signature

    # forged with chain.seal, unsigned: named by verify, refused by promote (CLI too)
    store.record_gate(s2.id, {"passed": True}, against=s1.id)
    forged = forged_approval(store, s2.id)
    assert store.chain().problems == []
    assert main([*w, "lineage", "verify", "--quick"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert f"(approve, {forged.name}): it carries no approval signature, although approvals are signed since " \
           f"event {ev.seq}" in out, out
    assert main([*w, "lineage", "promote", s2.id[:12], "--by", "mallory", "--no-mlflow", "--no-dvc"]) == 2
    assert forged.name in capsys.readouterr().err and store.champion() == s1.id

    # signed by a key not in allowed_signers (mallory signing as alice)
    forged.unlink()
    chain = store.chain()
    body = seal({"seq": chain.last_seq + 1, "type": "approve", "state": s2.id, "by": "alice", "at": "t",
                 "comment": "", "data": {}, "actor": {}}, chain.head)
    forged = forge_event(store, f"{chain.last_seq + 1:06d}-approve.json",
                    seal({**body, "signature": sign(payload(body), mallory, "alice")}, chain.head))
    assert store.chain().problems == []
    problems = store.verify(deep=False).problems
    assert any(forged.name in p and "is not a good signature by 'alice'" in p for p in problems), problems
    with pytest.raises(PromotionRefused, match=f"{forged.name}.*not a good signature"):
        ops.promote(workspace, store, s2.id, by="bob", params=params)

    # alice's real signature, moved onto another payload (her approval of s1 copied to s2)
    forged.unlink()
    forged = forged_approval(store, s2.id, signature=real_sig)
    assert any(forged.name in p and "not a good signature" in p for p in store.verify(deep=False).problems)
    with pytest.raises(PromotionRefused, match=f"{forged.name}.*not a good signature"):
        ops.promote(workspace, store, s2.id, by="bob", params=params)

    # a signed approval edited afterwards (its chain recomputed): the signature no longer holds
    forged.unlink()
    good = store.approve(s2.id, by="alice", key=alice)
    path = store.events_dir / good.file
    raw = json.loads(path.read_text())
    path.write_text(json.dumps(seal({**raw, "comment": "edited"}, raw["prev"])))
    assert store.chain().problems == []
    with pytest.raises(PromotionRefused, match=f"{good.file}.*not a good signature"):
        ops.promote(workspace, store, s2.id, by="bob", params=params)
    path.write_text(json.dumps(raw))  # as signed: it promotes
    ops.promote(workspace, store, s2.id, by="bob", params=params)
    assert store.champion() == s2.id

    # the chain rewritten from its first event on (each digest recomputed): the chain checks out, but
    # every signed approval after the edit signed the old prev
    prev = None
    for p in sorted(store.events_dir.glob("*.json")):
        old = json.loads(p.read_text())
        if old["seq"] == 1:
            old["comment"] = "rewritten"
        new = seal(old, prev or old["prev"])
        p.write_text(json.dumps(new))
        prev = new["digest"]
    assert store.chain().problems == []
    named = [p for p in store.verify(deep=False).problems if "not a good signature" in p]
    assert len(named) == 2 and ev.file in named[0] and good.file in named[1], named


def test_approve_refuses_what_would_not_count(workspace, stored_lm, tmp_path, monkeypatch, capsys,
                                              run_batches):
    """No key, a missing key file, a key the allowed signers do not list for the name, no ssh-keygen:
    each a clear error naming it, and nothing written."""
    from kedit.cli import main

    alice, mallory = _key(tmp_path, "alice"), _key(tmp_path, "mallory")
    _, store = _signing_ws(workspace, tmp_path, monkeypatch, {"alice": alice})
    (s1,) = run_batches(store, stored_lm(), 1)
    store.record_gate(s1.id, {"passed": True}, against=None)
    w = ["-w", str(workspace.root), "lineage", "approve", s1.id[:12], "--by", "alice"]
    assert main(w) == 2
    assert "no SSH signing key for the approval" in capsys.readouterr().err
    assert main([*w, "--key", str(tmp_path / "nope")]) == 2
    assert f"--key: SSH signing key {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert main([*w, "--key", str(mallory)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "is not a good signature by 'alice'" in err and "would not count, so it was not recorded" in err
    with pytest.raises(SigningError, match="ssh-keygen not found on PATH"):
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        store.approve(s1.id, by="alice", key=alice)
    monkeypatch.undo()
    assert [e.type for e in store.events()] == ["gate"]
    # the key from $KEDIT_SIGNING_KEY (a .pub path names its private key)
    monkeypatch.setenv("KEDIT_SIGNING_KEY", f"{alice}.pub")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "no-gitconfig"))
    assert store.approve(s1.id, by="alice").signature is not None
    assert store.promotion_check(s1.id).ok
    # verify without ssh-keygen cannot check it: named, and the approval does not count
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    fresh = LineageStore(workspace.lineage_dir, signing=store.signing)
    assert any("cannot be checked: ssh-keygen not found" in p for p in fresh.verify(deep=False).problems)
    assert not fresh.promotion_check(s1.id).ok


def test_unsigned_approvals_from_before_signing(workspace, stored_lm, tmp_path, monkeypatch, capsys,
                                                run_batches, gate_and_approve):
    """Switching signing on in a lineage with unsigned approvals: they are not named as problems (verify
    stays clean until the first signed approval), but they no longer count for a promotion."""
    alice = _key(tmp_path, "alice")
    plain = LineageStore(workspace.lineage_dir)
    s1, s2 = run_batches(plain, stored_lm(), 2)
    gate_and_approve(plain, s1)
    plain.promote(s1.id, by="bob")
    gate_and_approve(plain, s2)  # unsigned, before signing was on
    params, store = _signing_ws(workspace, tmp_path, monkeypatch, {"alice": alice})
    rep = store.verify(deep=False)
    assert rep.ok and store.champion() == s1.id
    assert "2 approve events (first 2, last 5) carry no approval signature" in " ".join(rep.notes), rep.notes
    from kedit.cli import main

    assert main(["-w", str(workspace.root), "lineage", "log"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("approved by alice") == 2 and out.count("(unsigned: does not count)") == 2, out
    with pytest.raises(PromotionRefused, match="carries no approval signature .*--key PATH"):
        ops.promote(workspace, store, s2.id, by="bob", params=params)
    # the Python API with a store made without the setting: ops.promote applies params.yaml's
    with pytest.raises(PromotionRefused, match="carries no approval signature"):
        ops.promote(workspace, LineageStore(workspace.lineage_dir), s2.id, by="bob", params=params)
    store.approve(s2.id, by="alice", key=alice)
    ops.promote(workspace, store, s2.id, by="bob", params=params)
    assert store.champion() == s2.id and store.verify(deep=False).ok


def test_signing_settings_are_checked(workspace, tmp_path):
    from kedit.lineage.access import lineage_params

    ws = workspace
    assert not signing_config(ws.root, {"approval_signing": False}).on
    assert signing_config(ws.root, {"approval_signing": "ssh"}).allowed_signers == ws.root.resolve() / "allowed_signers"
    with pytest.raises(SigningError, match="'gpg' is not a signing mode"):
        signing_config(ws.root, {"approval_signing": "gpg"})
    with pytest.raises(SigningError, match="outside the workspace"):
        signing_config(ws.root, {"approval_signing": "ssh", "allowed_signers": "../elsewhere"})
    (ws.root / "params.yaml").write_text("lineage: {approval_signing: 1}\n")
    with pytest.raises(ParamsError, match="key 'approval_signing': expected a string or a boolean"):
        lineage_params(ws)
    (ws.root / "params.yaml").write_text("lineage: {approval_signing: gpg}\n")
    with pytest.raises(SigningError, match="not a signing mode"):
        ops.open_store(ws)


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_nightly_decide_step_uses_the_reviewers_signed_approval(workspace, stored_lm, tmp_path, monkeypatch,
                                                                run_batches):
    """The decide step does not sign on a reviewer's behalf: without a key on the worker it says how to
    approve; with the reviewer's signed approval recorded it promotes without writing another, and the
    promotion commit carries the allowed signers file."""
    from kedit.lineage.versioning import Versioning, state_tag
    from kedit.refresh import decide_step

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    alice = _key(tmp_path, "alice")
    _, store = _signing_ws(workspace, tmp_path, monkeypatch, {"alice": alice}, extra=", mlflow: false")
    (s1,) = run_batches(store, stored_lm(), 1)
    v = Versioning(workspace)
    v.ensure()
    store.record_gate(s1.id, {"passed": True}, against=None)
    with pytest.raises(SigningError, match=f"approve with your own key first .*kedit lineage approve {s1.id[:12]}"):
        decide_step(workspace, "k", s1.id, True, "alice", "looks right")
    assert [e.type for e in store.events()] == ["gate"]
    store.approve(s1.id, by="alice", key=alice)
    out = decide_step(workspace, "k", s1.id, True, "alice", "looks right")
    assert out["decision"] == "promoted" and store.champion() == s1.id
    assert [e.type for e in store.events()] == ["gate", "approve", "promote"]
    committed = v.git("show", f"{state_tag(s1.id)}:allowed_signers")
    assert committed == (workspace.root / "allowed_signers").read_text().strip()


def test_a_shared_lineage_carries_the_allowed_signers(workspace, stored_lm, tmp_path, monkeypatch,
                                                      run_batches, forged_approval):
    """On a shared lineage (git + DVC remotes, no servers) the allowed signers file and params.yaml travel
    with the publishing commits: a fresh workspace elsewhere checks the signed approval it pulled, and
    refuses a forged one."""
    from kedit.lineage.shared import section
    from kedit.workspace import Workspace

    monkeypatch.delenv("KEDIT_LOCK_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("KEDIT_GIT_REMOTE", str(tmp_path / "remote" / "lineage.git"))
    monkeypatch.setenv("KEDIT_DVC_REMOTE", str(tmp_path / "remote" / "dvc"))
    alice = _key(tmp_path, "alice")
    params, store = _signing_ws(workspace, tmp_path, monkeypatch, {"alice": alice}, extra=", mlflow: false")
    with section(workspace, "edit", params):
        s1, s2 = run_batches(store, stored_lm(), 2)
        store.record_gate(s1.id, {"passed": True}, against=None)
        store.approve(s1.id, by="alice", key=alice)
        store.record_gate(s2.id, {"passed": True}, against=s1.id)

    b = Workspace(tmp_path / "b")
    with section(b, "promote", params):
        assert (b.root / "allowed_signers").read_text() == (workspace.root / "allowed_signers").read_text()
        params_b = ops.lineage_params(b)
        store_b = ops.open_store(b, params_b)
        assert store_b.signing.on and store_b.signing.allowed_signers == b.root.resolve() / "allowed_signers"
        ops.promote(b, store_b, s1.id, by="bob", params=params_b)
        forged = forged_approval(store_b, s2.id)
        with pytest.raises(PromotionRefused, match=f"{forged.name}.*carries no approval signature"):
            ops.promote(b, store_b, s2.id, by="bob", params=params_b)
        forged.unlink()
    assert store_b.champion() == s1.id
