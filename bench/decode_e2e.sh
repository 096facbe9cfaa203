#!/usr/bin/env bash
# The runs behind bench/README.md's whole-model decode tables (one H100/H200; each part fits one
# 10-minute device call). Usage: bash bench/decode_e2e.sh {tests|128k|32k|512k|b4} [methods...]
set -uo pipefail
export PYTHONPATH=$PWD LSA_BENCH_OUT=${OUT:-/tmp} PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
part=$1
shift
methods=${*:-dense_static_graph dense_reserve_graph lsa_eager lsa_graph lsa_graph_lag lsa_graph_no_refresh dense_dynamic}
run() { python3 -m bench.decode_e2e "$@" --methods $methods; }
case "$part" in
  tests) python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_generate.py tests/test_cache.py ;;
  32k) run --layers 32 --lengths 32768 --profile --tag=_32l_32k ;;
  128k) run --layers 32 --lengths 131072 --tag=_32l_128k ;;
  512k) run --layers 4 --lengths 524288 --tag=_4l_512k ;;
  b4) run --layers 32 --lengths 32768 --batch 4 --tag=_32l_32k_b4 ;;
esac
