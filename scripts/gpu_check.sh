#!/usr/bin/env bash
# The GPU checks in one call: the gpu-marked tests and the CUDA benchmark.
#
#   bash scripts/gpu_check.sh prepare    # here (pip works): .whl/ with the packages the GPU image lacks
#                                        # (hydra-core, omegaconf, antlr4 runtime) and shared_data/omniglot
#   bash scripts/gpu_check.sh run [DIR]  # on the GPU machine (no network): writes DIR (default $OUT,
#                                        # else ./gpu_check): nvidia-smi.txt, pytest_gpu.txt, bench_cuda*.{json,txt}
#
# With the session's `device` tool: run `prepare` here, then
#   run(command="bash scripts/gpu_check.sh run", carry=[".whl", "shared_data"], timeout_s=...)
# The GPU image's python3 holds torch; the package runs from the checkout (PYTHONPATH=src), with
# logger=none paths only (comet_ml is imported lazily and not needed).
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
case "$mode" in
prepare)
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  mkdir -p .whl shared_data
  py=$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl hydra-core==1.3.2 omegaconf==2.3.0 || exit 1
  "$py" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 || exit 1  # an sdist upstream
  src="${FEWSHOT_DATA:-../shared/data}/omniglot"
  [ -d "$src" ] && mkdir -p shared_data/omniglot && cp -r "$src"/images_background.zip "$src"/images_evaluation.zip \
    "$src"/splits shared_data/omniglot/ 2>/dev/null
  du -sh .whl shared_data
  ;;
run)
  out="${2:-${OUT:-gpu_check}}"
  mkdir -p "$out"
  export PYTHONUNBUFFERED=1
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || exit 1
    export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  [ -d shared_data/omniglot ] && export FEWSHOT_DATA="$PWD/shared_data"
  nvidia-smi > "$out/nvidia-smi.txt" 2>&1
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
  python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu tests/ops 2>&1 | tee "$out/pytest_gpu.txt" | tail -5
  python3 scripts/bench.py --quick --devices cuda --json "$out/bench_cuda.json" 2>&1 | tee "$out/bench_cuda.txt" | tail -20
  # the same MAML cases with the whole step as one CUDA graph, and with a 1 GiB cap chunking the meta-batch
  maml=maml_5w1s_mb32_1step,maml_5w1s_mb32_5step,fomaml_5w1s_mb32_1step
  python3 scripts/bench.py --quick --devices cuda --cases $maml --cuda-graphs --json "$out/bench_cuda_graphs.json" \
    2>&1 | tee "$out/bench_cuda_graphs.txt" | tail -12
  python3 scripts/bench.py --quick --devices cuda --cases $maml --memory-cap-mb 1024 --json "$out/bench_cuda_cap.json" \
    2>&1 | tee "$out/bench_cuda_cap.txt" | tail -12
  ;;
*)
  echo "usage: bash scripts/gpu_check.sh prepare | run [OUT_DIR]" >&2
  exit 2
  ;;
esac
