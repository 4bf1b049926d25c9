#!/usr/bin/env bash
# The checks and numbers of the CUDA path, on one GPU, in a few minutes:
#   1. tests/test_devices.py, then a tiny pretrain and finetune on the GPU, each cut short and resumed on the
#      CPU, and the same from the CPU to the GPU (the generator is reseeded across devices, with a warning);
#   2. PPO ratio = 1 and path KL = 0 before the first update, per precision (fp32, and bf16 and fp16 when
#      finetune has --precision);
#   3. pretraining: the default dino run (steps/s of its optimizer steps, peak GPU memory), then
#      scripts/bench_pretrain.py --device cuda (old and new defaults side by side, one seed);
#   4. fine-tuning: the fine-tuning benchmark's ddpo-is setting (dino, DDIM 50 steps eta 1, in_region disc,
#      256 chains, 10 epochs): denoising steps/s, epoch seconds and peak GPU memory, per precision;
#   5. `torchrun --nproc_per_node 1` of finetune on the GPU, and an nccl process group (all_reduce,
#      all_gather, a DistributedDataParallel backward): one rank takes the code's single-process path.
# Prints every number and, when $OUT is set, writes them all to $OUT/gpu_check.json.
#
#     bash scripts/gpu_check.sh              # on a machine with a CUDA GPU (runs `make install` if .venv is missing)
#     DEVICE=cpu bash scripts/gpu_check.sh   # every step on the CPU (gloo for nccl): checks the script, not a GPU
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then make install; fi
PY=.venv/bin/python
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
RESULTS="$WORK/results.jsonl"
DEVICE=${DEVICE:-cuda}
export RESULTS WORK DEVICE

cli() { "$PY" -m rl_diffusion.cli "$@"; }

# record NAME JSON: print it and keep it for gpu_check.json. The JSON comes from a variable, never straight from
# a $(...) in the call: a failing command substitution in an argument would not stop the script.
record() {
    echo "$1: $2"
    "$PY" -c 'import json, os, sys
open(os.environ["RESULTS"], "a").write(json.dumps({sys.argv[1]: json.loads(sys.argv[2])}) + "\n")' "$1" "$2"
}

echo "== 0. the device"
value=$("$PY" - <<'PYTHON'
import json, os, sys
import torch
if os.environ["DEVICE"] != "cpu" and not torch.cuda.is_available():
    sys.exit(f"no CUDA GPU visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); nothing to check")
print(json.dumps({"device": os.environ["DEVICE"], "torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))
PYTHON
)
record device "$value"
PRECISIONS=fp32
cli finetune --help >"$WORK/help"
if grep -q -- "--precision" "$WORK/help"; then PRECISIONS="fp32 bf16 fp16"; fi
export PRECISIONS

echo "== 1. devices, and runs resumed on another device"
"$PY" -m pytest -q tests/test_devices.py
TINY=(--dataset moons --steps 200 --num-timesteps 20 --hidden-size 64 --batch-size 512 --input-embedding identity
    --eval-every 100 --eval-samples 500 --checkpoint-every 100 --quiet)
FT=(--reward target_point --reward-arg "point=[1.5,1.5]" --chains 64 --epochs 4 --checkpoint-every 2 --quiet)
cut_last() { find "$1/checkpoints" -name 'step_*.pt' | sort | tail -1 | xargs rm; }
# resume FROM TO COMMAND RUN: resume RUN on device TO; across kinds of device it must say so on stderr
resume() {
    cli "$3" --resume "$4" --device "$2" >/dev/null 2>"$WORK/err" || { cat "$WORK/err" >&2; return 1; }
    if [ "${1%%:*}" != "${2%%:*}" ] && ! grep -q "saved on ${1%%:*} and continue on ${2%%:*}" "$WORK/err"; then
        echo "$3 saved on $1 resumed on $2 without the cross-device warning" >&2
        return 1
    fi
}
sources=("$DEVICE")
if [ "$DEVICE" != cpu ]; then sources+=(cpu); fi
for from in "${sources[@]}"; do
    to=$([ "$from" = cpu ] && echo "$DEVICE" || echo cpu)
    cli pretrain --out "$WORK/moons-$from" --device "$from" "${TINY[@]}" >/dev/null
    cut_last "$WORK/moons-$from"
    resume "$from" "$to" pretrain "$WORK/moons-$from"
    cli finetune --run "$WORK/moons-$from" --out "$WORK/ft-$from" --device "$from" "${FT[@]}" >/dev/null
    cut_last "$WORK/ft-$from"
    resume "$from" "$to" finetune "$WORK/ft-$from"
    record "resume_${from//:/}_to_${to//:/}" '"ok"'
done

echo "== 2. ratio = 1 and path KL = 0 before the first update"
for precision in $PRECISIONS; do
    value=$("$PY" - "$precision" <<'PYTHON'
import json, os, sys
from pathlib import Path
import torch
from rl_diffusion.algos.base import Algorithm
from rl_diffusion.finetune import FinetuneConfig
from rl_diffusion.run import setup
from rl_diffusion.path_kl import path_kls, policy_step

precision, work = sys.argv[1], Path(os.environ["WORK"])
extra = {} if precision == "fp32" else {"precision": precision}
cfg = FinetuneConfig(run=str(work / "moons-cpu"), reward="target_point", reward_args={"point": [1.5, 1.5]},
                     chains=256, device=os.environ["DEVICE"], **extra)
s = setup(cfg, work / f"ratio-{precision}", overwrite=True)
pairs, _, _ = Algorithm(s).sample(torch.Generator(device=s.device).manual_seed(0))
with torch.no_grad():
    new = policy_step(s.diffusion, s.config, s.policy, pairs, torch.arange(len(pairs), device=s.device))
    ratio_error = (torch.exp(new.log_prob - pairs.log_prob_old) - 1).abs().max().item()
    kl = path_kls(s.diffusion, s.config, s.policy, s.reference, pairs, s.steps_per_chain).abs().max().item()
print(json.dumps({"max_abs_ratio_minus_1": ratio_error, "max_abs_path_kl": kl}))
# fp32 must be exact; the lower precisions within tests/test_precision.py's tolerance
assert kl == 0.0 and ratio_error <= (0.0 if precision == "fp32" else 1e-3), (ratio_error, kl)
PYTHON
)
    record "start_of_finetuning_$precision" "$value"
done

echo "== 3. pretraining benchmark"
value=$("$PY" - <<'PYTHON'
import json, os
from pathlib import Path
import torch
from pretrain.train import config_for, pretrain

config = config_for({"dataset": "dino", "device": os.environ["DEVICE"]})
out = pretrain(config, Path(os.environ["WORK"]) / "dino", progress=False)
seconds = json.loads((out / "timing.json").read_text())["seconds"]
print(json.dumps({
    "steps_per_sec": config.steps / seconds["optimizer_steps"],
    "batch_size": config.batch_size,
    "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    "seconds_by_phase": seconds,
}))
PYTHON
)
record pretrain_dino "$value"
"$PY" scripts/bench_pretrain.py --device "$DEVICE" --seeds 1 --skip-levers --skip-ceiling \
    --out "$WORK/bench_pretrain.json" >/dev/null
value=$("$PY" -c 'import json, sys
result = json.load(open(sys.argv[1]))
print(json.dumps({k: result[k] for k in ("markdown_side_by_side", "old_defaults", "new_defaults")}))' \
    "$WORK/bench_pretrain.json")
record bench_pretrain "$value"

echo "== 4. fine-tuning benchmark"
for precision in $PRECISIONS; do
    extra=()
    if [ "$precision" != fp32 ]; then extra=(--precision "$precision"); fi
    cli finetune --run "$WORK/dino" --out "$WORK/rl-$precision" --device "$DEVICE" --algo ddpo-is --sampler ddim \
        --sampling-steps 50 --eta 1 --reward in_region --reward-arg shape=disc --reward-arg "center=[2,-1]" \
        --reward-arg radius=1 --chains 256 --epochs 10 --quiet "${extra[@]}" >/dev/null
    value=$("$PY" - "$WORK/rl-$precision" <<'PYTHON'
import json, statistics, sys
from rl_diffusion.checkpoint import CheckpointManager

history = CheckpointManager(sys.argv[1]).load_latest()["train_state"]["history"][1:]  # the first epoch warms up
print(json.dumps({
    "denoising_steps_per_sec_median": statistics.median(h["perf/steps_per_sec"] for h in history),
    "epoch_seconds_median": statistics.median(h["perf/epoch_seconds"] for h in history),
    "peak_memory_mib": max(h["perf/peak_memory_mb"] for h in history),
    "final_reward_mean": history[-1]["reward/mean"],
}))
PYTHON
)
    record "finetune_dino_ddpo_is_$precision" "$value"
done

echo "== 5. torchrun on one GPU, nccl"
.venv/bin/torchrun --standalone --nproc_per_node 1 -m rl_diffusion.cli finetune --pretrained "$WORK/moons-cpu" \
    --out "$WORK/torchrun" --device "$DEVICE" "${FT[@]}" >/dev/null
test -f "$WORK/torchrun/metrics.json"
cat >"$WORK/nccl.py" <<'PYTHON'
import os
import torch
import torch.distributed as dist

cuda = os.environ["DEVICE"] != "cpu"
dist.init_process_group("nccl" if cuda else "gloo")
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
x = torch.arange(4.0, device=device)
total, parts = x.clone(), [torch.empty_like(x) for _ in range(dist.get_world_size())]
dist.all_reduce(total)
dist.all_gather(parts, x)
assert torch.equal(total, x * dist.get_world_size()) and all(torch.equal(p, x) for p in parts)
model = torch.nn.parallel.DistributedDataParallel(
    torch.nn.Linear(4, 1).to(device), device_ids=[device.index] if cuda else None
)
model(x[None]).sum().backward()
print(f"{dist.get_backend()}: all_reduce, all_gather and a DDP backward ok")
dist.destroy_process_group()
PYTHON
.venv/bin/torchrun --standalone --nproc_per_node 1 "$WORK/nccl.py"
record torchrun_one_rank '"ok"'

echo "== all checks passed"
"$PY" - <<'PYTHON'
import json, os
results = {}
for line in open(os.environ["RESULTS"]):
    results.update(json.loads(line))
text = json.dumps(results, indent=2)
if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as f:
        f.write(text)
print(text)
PYTHON
