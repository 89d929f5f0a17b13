#!/usr/bin/env bash
# Everything loraplex checks on a GPU, in phases that each fit one device call (10 min):
#
#   here:        scripts/gpu_wheels.sh
#   on the GPU, in this order (a session has 15 device-minutes, a machine's start
#   included: `first` is sized to fit one call; the rest wait for later sessions):
#                bash scripts/gpu_session.sh first        # kernels' tests + issue 6's 8B batch 32
#                bash scripts/gpu_session.sh tests        # GPU-only tests (kernels, graphs)
#                bash scripts/gpu_session.sh decode       # issue 6 targets: 8B + HF, then 1B
#                bash scripts/gpu_session.sh adapters     # issue 7 targets: many adapters, 1B
#                bash scripts/gpu_session.sh decode-mlp   # all-linear adapters, 8B and 1B
#                bash scripts/gpu_session.sh kv-fp8       # FP8 KV cache against bf16's, 8B
#                bash scripts/gpu_session.sh spec         # ngram speculative decoding vs plain
#                bash scripts/gpu_session.sh moe          # LoRA on Mixtral-shaped experts
#                bash scripts/gpu_session.sh gpt-oss      # gpt-oss-20b shapes, MXFP4 and bf16
#                bash scripts/gpu_session.sh kernels      # LoRA op, attention, slot-swap microbenchmarks
#                bash scripts/gpu_session.sh quant        # GPTQ / AWQ 4-bit bases, 8B
#                bash scripts/gpu_session.sh quant-bnb    # bitsandbytes NF4 on its kernel, 8B, 1B
#                bash scripts/gpu_session.sh quant-fp8    # an FP8 base on its Triton kernel, 8B
#                bash scripts/gpu_session.sh suite        # the whole suite on the GPU machine
#
# decode_step.py writes its JSON after every round, so a run cut by its timeout keeps
# the rounds it finished ("complete": false).
#
# (device tool: carry [".gpu_wheels"]). Results land in $OUT (JSON + logs), to be copied
# into benchmarks/results/ and docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/loraplex_gpu_out}
mkdir -p "$OUT"
phase=${1:-tests}
python3 -m pip install -q --no-deps --no-index --find-links .gpu_wheels .gpu_wheels/*.whl \
  >"$OUT/pip.log" 2>&1 || tail -5 "$OUT/pip.log"
python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/pip.log" 2>&1 \
  || tail -5 "$OUT/pip.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
case "$phase" in
  first)  # one 10-minute call: the LoRA / attention kernels and CUDA graphs against the
    # torch reference, then issue 6's targets at its batch (8B, 32: base, one, mixed, HF +
    # PEFT mixed) and the 1B sweep
    timeout 170 python3 -m pytest -q --maxfail=10 -p no:cacheprovider -o addopts="" \
      tests/test_triton_lora_ops.py tests/test_attention.py tests/test_cuda_graphs.py \
      2>&1 | tee "$OUT/pytest_gpu_first.txt" | tail -8
    timeout 280 python3 benchmarks/decode_step.py --shape llama-3.1-8b --device cuda \
      --batch-sizes 32 --repeats 1 --hf --hf-new-tokens 16 \
      --out "$OUT/decode_step_cuda_8b_b32.json" 2>&1 | tail -12
    timeout 110 python3 benchmarks/decode_step.py --shape llama-3.2-1b --device cuda \
      --batch-sizes 1 8 32 64 --repeats 1 --out "$OUT/decode_step_cuda_1b.json" 2>&1 | tail -14
    ;;
  tests)
    timeout 560 python3 -m pytest -q --maxfail=25 -p no:cacheprovider -o addopts="" \
      tests/test_triton_lora_ops.py tests/test_attention.py tests/test_cuda_graphs.py \
      tests/test_triton_quant.py tests/test_triton_bnb.py tests/test_lora_vocab_layers.py \
      tests/test_added_tokens.py tests/test_architectures.py tests/test_modules_to_save.py \
      tests/test_dora.py tests/test_long_lora.py tests/test_reasoning.py tests/test_fp8.py \
      tests/test_text_only.py tests/test_responses_api.py tests/test_triton_fp8.py \
      tests/test_gpt_oss.py tests/test_priority_scheduling.py tests/test_triton_mxfp4.py \
      tests/test_compressed_tensors.py tests/test_quantized_moe.py tests/test_bnb_moe.py \
      tests/test_llava.py tests/test_llava_next.py tests/test_kv_cache_fp8.py \
      tests/test_spec_decode.py tests/test_embeddings.py tests/test_more_architectures.py \
      tests/test_compressed_tensors_w8a8.py tests/test_gemma3_images.py tests/test_qwen2_vl.py \
      tests/test_cross_encoder.py tests/test_classify.py tests/test_generate_api.py \
      tests/test_llama4.py tests/test_prompt_embeds.py \
      2>&1 | tee "$OUT/pytest_gpu.txt" | tail -15
    ;;
  suite)
    timeout 580 python3 -m pytest -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_all.txt" \
      | tail -15
    ;;
  kernels)
    timeout 240 python3 benchmarks/lora_ops.py --device cuda --out "$OUT/lora_ops_cuda.json" \
      2>&1 | tail -30
    # no flex here: it compiles once per shape (~15 shapes, up to a minute each) and the
    # JSON is written only at the end, so a timeout would lose every row
    timeout 240 python3 benchmarks/attention.py --impls torch,torch_mirror,triton \
      --out "$OUT/attention_cuda.json" 2>&1 | tail -30
    timeout 90 python3 benchmarks/slot_load.py --shape llama-3.2-1b --device cuda \
      --workdir /tmp --out "$OUT/slot_load_cuda_1b.json" 2>&1 | tail -5
    ;;
  decode)
    timeout 380 python3 benchmarks/decode_step.py --shape llama-3.1-8b --device cuda \
      --batch-sizes 1 8 32 64 --hf --out "$OUT/decode_step_cuda_8b.json" 2>&1 | tail -20
    timeout 190 python3 benchmarks/decode_step.py --shape llama-3.2-1b --device cuda \
      --batch-sizes 1 8 32 64 --out "$OUT/decode_step_cuda_1b.json" 2>&1 | tail -20
    ;;
  spec)  # ngram speculative decoding against plain decoding, the same mixed-adapter batch
    timeout 300 python3 benchmarks/spec_decode.py --out "$OUT/spec_decode_cuda.json" \
      2>&1 | tail -5
    ;;
  kv-fp8)  # --kv-cache-dtype fp8 against the model's dtype, 8B, the same call
    for kv in auto fp8; do
      timeout 280 python3 benchmarks/decode_step.py --shape llama-3.1-8b --device cuda \
        --batch-sizes 32 64 --kv-cache-dtype $kv --out "$OUT/decode_step_cuda_8b_kv_$kv.json" \
        2>&1 | tail -8
    done
    ;;
  moe)  # LoRA on a mixture of experts' experts (torch ops, no CUDA graphs): Mixtral shapes
    timeout 560 python3 benchmarks/moe_decode.py --shape mixtral-16l --device cuda \
      --repeats 1 --batch-sizes 1 8 32 --out "$OUT/moe_decode_cuda.json" 2>&1 | tail -20
    ;;
  gpt-oss)  # gpt-oss-20b's shapes (12 of 24 layers): MXFP4 experts on their kernel, plain
    timeout 280 python3 benchmarks/moe_decode.py --shape gpt-oss-20b-12l --device cuda \
      --modes base attn-mixed --mxfp4 --repeats 1 --batch-sizes 1 8 32 \
      --out "$OUT/gpt_oss_decode_cuda_mxfp4.json" 2>&1 | tail -8
    timeout 280 python3 benchmarks/moe_decode.py --shape gpt-oss-20b-12l --device cuda \
      --modes base attn-mixed --repeats 1 --batch-sizes 1 8 32 \
      --out "$OUT/gpt_oss_decode_cuda_bf16.json" 2>&1 | tail -8
    ;;
  decode-mlp)
    timeout 330 python3 benchmarks/decode_step.py --shape llama-3.1-8b --device cuda \
      --targets all-linear --repeats 2 --batch-sizes 1 8 32 64 \
      --out "$OUT/decode_step_cuda_8b_all_linear.json" 2>&1 | tail -20
    timeout 240 python3 benchmarks/decode_step.py --shape llama-3.2-1b --device cuda \
      --targets all-linear --repeats 2 --batch-sizes 1 8 32 64 \
      --out "$OUT/decode_step_cuda_1b_all_linear.json" 2>&1 | tail -20
    ;;
  adapters)
    timeout 580 python3 benchmarks/many_adapters.py --shape llama-3.2-1b --device cuda \
      --rate 100 --requests 600 --burst-repeats 2 --workdir /tmp --out "$OUT/many_adapters_cuda.json" 2>&1 \
      | tail -20
    ;;
  quant)
    for q in gptq awq; do
      timeout 280 python3 benchmarks/decode_step.py --shape llama-3.1-8b --device cuda \
        --quantization $q --repeats 1 --batch-sizes 1 8 32 64 \
        --out "$OUT/decode_step_cuda_8b_$q.json" 2>&1 | tail -15
    done
    ;;
  quant-fp8)  # FP8 weights (Qwen3-FP8's block layout) on their Triton kernel
    timeout 400 python3 benchmarks/decode_step.py --shape llama-3.1-8b --device cuda \
      --quantization fp8 --repeats 1 --batch-sizes 1 8 32 64 \
      --out "$OUT/decode_step_cuda_8b_fp8.json" 2>&1 | tail -15
    ;;
  quant-bnb)
    for shape in llama-3.1-8b llama-3.2-1b; do
      timeout 280 python3 benchmarks/decode_step.py --shape $shape --device cuda \
        --quantization bnb-nf4 --repeats 1 --batch-sizes 1 8 32 64 \
        --out "$OUT/decode_step_cuda_${shape}_bnb_nf4.json" 2>&1 | tail -15
    done
    ;;
  *) echo "unknown phase $phase"; exit 2 ;;
esac
