"""`kedit model import|list|show|verify`."""

from __future__ import annotations

import json

from kedit.cli import workspace


def register(sub) -> None:
    p = sub.add_parser("model", help="import and list base models in the local model store")
    s = p.add_subparsers(dest="model_cmd", required=True)
    imp = s.add_parser("import", help="import an embedded model (smollm2-135m, gemma-3-270m) or --hf PATH into models/<slug>/")
    imp.add_argument("name", nargs="?", default=None, help="embedded model name: smollm2-135m, or gemma-3-270m (extra kedit[gemma])")
    imp.add_argument("--hf", default=None, help="path to a local HuggingFace causal-LM directory")
    imp.add_argument("--slug", default=None, help="store name for --hf (default: the folder name)")
    imp.add_argument("--arch", default=None, help="JSON/YAML architecture spec for an unknown family")
    imp.add_argument("--force", action="store_true", help="re-import even if present")
    imp.set_defaults(func=_import)
    ls = s.add_parser("list", help="models in the store")
    ls.set_defaults(func=_list)
    show = s.add_parser("show", help="a model's manifest and adapter")
    show.add_argument("model")
    show.set_defaults(func=_show)
    vf = s.add_parser("verify", help="hash every file of a store entry against its manifest (exit 1: damaged)")
    vf.add_argument("model")
    vf.set_defaults(func=_verify)


def _import(args) -> int:
    from kedit.cli import CLIError
    from kedit.models.store import import_embedded, import_hf

    ws = workspace(args)
    if args.hf:
        m = import_hf(ws, args.hf, slug=args.slug, arch=args.arch, force=args.force)
    elif args.name:
        m = import_embedded(ws, args.name, force=args.force)
    else:
        raise CLIError("name an embedded model (smollm2-135m, gemma-3-270m) or pass --hf PATH")
    print(f"imported {m.slug}: {m.model_type}, {m.n_params / 1e6:.1f}M params, hash {m.model_hash[:12]} "
          f"-> {ws.model_dir(m.slug)}")
    return 0


def _list(args) -> int:
    from kedit.cli.tables import print_table
    from kedit.models.store import list_models

    print_table([("slug", "left"), ("type", "left"), ("params", "right"), ("dtype", "left"), ("hash", "left"),
                 ("source", "left")],
                [[m.slug, m.model_type, f"{m.n_params / 1e6:.1f}M", m.dtype, m.model_hash[:12], m.source]
                 for m in list_models(workspace(args))])
    return 0


def _show(args) -> int:
    from kedit.models.store import load_model

    lm = load_model(args.model, workspace(args))
    print(json.dumps({"manifest": lm.manifest.__dict__, "adapter": lm.adapter.describe()}, indent=2))
    return 0


def _verify(args) -> int:
    from kedit.models.store import ModelCorruptError, verify_store_entry

    try:
        m = verify_store_entry(workspace(args), args.model)
    except ModelCorruptError as exc:
        print(f"PROBLEM: {exc}")
        return 1
    print(f"{m.slug}: {len(m.files)} files match their recorded sha256 (hash {m.model_hash[:12]})")
    return 0
