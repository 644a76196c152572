# Sourced by the prepared device calls (gpu_session.sh, gpu_long_context.sh): $OUT, the wheels the GPU image
# lacks (carried in .whl/, installed into /tmp/site), and the environment every run there uses.
OUT=${OUT:-bench/results}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python3 -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| peft', peft.__version__)"
