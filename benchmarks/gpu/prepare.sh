#!/usr/bin/env bash
# Stage, on this machine, what the lent GPU machine (the device tool) lacks, in two ignored
# folders that each fit its 64 MiB carry limit beside the working tree:
#   .gpu/a  the first 56 MiB of the embedded GGUF, and the Spec-Bench questions
#   .gpu/b  the rest of the GGUF, its sha256 and file name, and the gguf wheel (transformers
#           needs it to read GGUF files; the device image has torch, transformers, safetensors
#           and matplotlib but not gguf)
# Then, on the device, back to back (a machine stays warm ~30 s between calls):
#   run(command="bash benchmarks/gpu/run.sh stage", carry=[".gpu/a"])
#   run(command="bash benchmarks/gpu/run.sh bench", carry=[".gpu/b"], timeout_s=480)
# See docs/performance.md, "GPU".
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
QUESTIONS=${QUESTIONS:-../shared/data/spec_bench/question.jsonl}

gguf=$(PYTHONPATH=. "$PY" -c 'from clasp.loading import embedded_gguf_path; print(embedded_gguf_path())')
gguf_version=$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')
[ -f "$QUESTIONS" ] || { echo "no question file at $QUESTIONS (set QUESTIONS=)" >&2; exit 2; }
grep -qx '/.gpu/' .gitignore || { echo "/.gpu/ must be in .gitignore, or the staged files would travel twice" >&2; exit 2; }

rm -rf .gpu && mkdir -p .gpu/a .gpu/b/wheels
split -b 56M -d -a 2 "$gguf" .gpu/model.gguf.
[ "$(ls .gpu/model.gguf.* | wc -l)" -eq 2 ] || { echo "expected the GGUF to split in two parts" >&2; exit 1; }
mv .gpu/model.gguf.00 .gpu/a/ && mv .gpu/model.gguf.01 .gpu/b/
sha256sum "$gguf" | cut -d' ' -f1 > .gpu/b/model.gguf.sha256
basename "$gguf" > .gpu/b/model.gguf.name
cp "$QUESTIONS" .gpu/a/question.jsonl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    --platform any -d .gpu/b/wheels "gguf==$gguf_version"

tree_mib=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
for part in a b; do
    total=$(( tree_mib + $(du -sb ".gpu/$part" | cut -f1) ))
    printf '.gpu/%s: %d MiB with the working tree (limit 64)\n' "$part" $(( total / 1048576 ))
    [ "$total" -lt $(( 64 * 1048576 )) ] || { echo ".gpu/$part is over the carry limit" >&2; exit 1; }
done
