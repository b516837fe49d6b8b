#!/usr/bin/env bash
# lm-eval against `r4b serve` on loopback: a tiny synthetic checkpoint, the local 6-question task in
# scripts/harness_tasks/, scored by loglikelihood through /v1/completions (local-completions: echo +
# logprobs) and by generation through /v1/chat/completions (local-chat-completions). Prints both tables.
# The scores of random weights mean nothing; the check is that the harness runs end to end.
#
#   bash scripts/harness_check.sh            # LM_EVAL=path/to/lm_eval to use another install
#
# Needs lm-eval with its API extra (pip install 'lm-eval[api]'; a venv made with --system-site-packages
# keeps r4b's torch), and r4b installed with the serve extra.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
lm_eval="${LM_EVAL:-lm_eval}"
work="$(mktemp -d)"
trap 'kill "${server_pid:-}" 2>/dev/null || true; wait "${server_pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
r4b make-synthetic "$work/ckpt" --preset tiny >/dev/null
port="$(python -c 'from r4b_core.serve.server import free_port; print(free_port())')"
r4b serve --model "$work/ckpt" --served-model-name r4b-tiny --port "$port" --max-seq-len 512 \
  --log-level warning &
server_pid=$!
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  sleep 0.5
done
curl -sf "http://127.0.0.1:$port/health" >/dev/null || { echo "r4b serve did not start" >&2; exit 1; }
cd "$here/harness_tasks"  # the tasks' data_files are relative to here
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$lm_eval" --model local-completions --tasks r4b_tiny_mc --include_path . --output_path "$work/out-mc" \
  --model_args "model=r4b-tiny,base_url=http://127.0.0.1:$port/v1/completions,tokenizer=$work/ckpt,num_concurrent=1,max_retries=1,tokenized_requests=True"
"$lm_eval" --model local-chat-completions --apply_chat_template --tasks r4b_tiny_gen --include_path . \
  --output_path "$work/out-gen" \
  --model_args "model=r4b-tiny,base_url=http://127.0.0.1:$port/v1/chat/completions,num_concurrent=1,max_retries=1"
