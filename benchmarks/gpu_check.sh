#!/usr/bin/env bash
# llmlab's GPU paths on a machine with a CUDA GPU, from the repository root: what llmlab sees, the transformers and
# llama.cpp test modules run on the GPU (llama.cpp after llama_gpu_load.py has loaded the model each way in a process
# of its own), and the five datasets through each backend on the GPU (accuracy, items/s, pp512/tg128), each next to
# nothing but itself: compare with the same commands on the CPU.
#
#   benchmarks/gpu_check.sh DATA_DIR [OUTPUT_DIR] [LIMIT]
#
# BACKENDS="transformers llama.cpp" (the default) picks the parts; PYTEST_ADDOPTS reaches every pytest run (e.g.
# -k "not gemma" where Gemma 3 is not installed). llama.cpp needs a CUDA build of llama-cpp-python
# (CMAKE_ARGS="-DGGML_CUDA=on" pip install llama-cpp-python --no-cache-dir); without one its part says so and stops.
set -uo pipefail
data=${1:?usage: benchmarks/gpu_check.sh DATA_DIR [OUTPUT_DIR] [LIMIT]}
out=${2:-.llmlab/gpu-check}
limit=${3:-50}
export LLMLAB_DATA_DIR=$data
failed=()

step() {  # run one check, remember it if it fails, go on with the others
    echo "== $*"
    "$@" || failed+=("$*")
}

step python3 -m llmlab_fixtures.cli system
for backend in ${BACKENDS:-transformers llama.cpp}; do
    case $backend in
    transformers)
        step env LLMLAB_TEST_DEVICE=cuda python3 -m pytest -p no:cacheprovider -q -rs -s \
            tests/providers/transformers/test_provider.py
        step python3 -m pytest -p no:cacheprovider bench --models=transformers:smollm2-135m --device cuda \
            --limit "$limit" --data-dir "$data" --output-dir "$out/transformers"
        ;;
    llama.cpp)
        if ! python3 -c "import sys; from llmlab_fixtures.models.resources import llama_gpu_offload
sys.exit(not llama_gpu_offload())"; then
            echo "== llama.cpp: this llama-cpp-python build has no GPU offload; rebuild it with CUDA (see above)"
            failed+=("llama.cpp offload")
            continue
        fi
        step python3 benchmarks/llama_gpu_load.py
        step env LLMLAB_TEST_GPU_LAYERS=-1 python3 -m pytest -p no:cacheprovider -q -rs -s \
            tests/providers/llama_cpp/test_provider.py
        step python3 -m pytest -p no:cacheprovider bench --models=local:smollm2-135m --gpu-layers -1 \
            --limit "$limit" --data-dir "$data" --output-dir "$out/llama.cpp"
        ;;
    *)
        echo "unknown backend $backend in BACKENDS (transformers, llama.cpp)"
        failed+=("$backend")
        ;;
    esac
done
if ((${#failed[@]})); then
    printf '== failed: %s\n' "${failed[@]}"
    exit 1
fi
echo "== GPU checks passed"
