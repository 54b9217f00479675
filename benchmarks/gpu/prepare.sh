#!/usr/bin/env bash
# Stage, here, what the lent GPU machine (the device tool) lacks, in two ignored folders that each
# travel in one call, with the working tree, under the tool's 64 MiB limit:
#   .gpu/a  the first half of the embedded GGUF, and the Spec-Bench questions
#   .gpu/b  the second half, its sha256 and file name, and the gguf wheel (transformers needs it
#           to read GGUF files; the device image has torch, transformers, safetensors, pytest and
#           matplotlib but not gguf)
# Run it in the checkout the session was started in: the device tool sends that checkout (also
# when a helper calls from another worktree), so .gpu/ must be there. Then the two calls of
# benchmarks/gpu/README.md.
# What travels per call, and is counted here: tracked files and untracked files git does not
# ignore (that exist), a shared/ folder inside the checkout, and the carried folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
QUESTIONS=${QUESTIONS:-../shared/data/spec_bench/question.jsonl}
LIMIT=$(( 64 * 1048576 ))

gguf=$(PYTHONPATH=. "$PY" -c 'from clasp.loading import embedded_gguf_path; print(embedded_gguf_path())')
gguf_version=$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')
[ -f "$QUESTIONS" ] || { echo "no question file at $QUESTIONS (set QUESTIONS=)" >&2; exit 2; }
git check-ignore -q .gpu/x || { echo "/.gpu/ must be ignored (.gitignore), or the staged files would travel twice" >&2; exit 2; }

rm -rf .gpu && mkdir -p .gpu/a .gpu/b/wheels
split -n 2 -d -a 2 "$gguf" .gpu/model.gguf.  # two halves, so both calls have room
mv .gpu/model.gguf.00 .gpu/a/ && mv .gpu/model.gguf.01 .gpu/b/
sha256sum "$gguf" | cut -d' ' -f1 > .gpu/b/model.gguf.sha256
basename "$gguf" > .gpu/b/model.gguf.name
cp "$QUESTIONS" .gpu/a/question.jsonl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    --platform any -d .gpu/b/wheels "gguf==$gguf_version"

# The working tree as the tool sends it: tracked and untracked-not-ignored files that exist.
tree=$( (git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null || true) \
       | awk '{s += $1} END {print s + 0}')
shared=0 && [ -d shared ] && shared=$(du -sb shared | cut -f1)
for part in a b; do
    carried=$(du -sb ".gpu/$part" | cut -f1)
    awk -v p="$part" -v c="$carried" -v t="$tree" -v s="$shared" 'BEGIN { m = 1048576;
        printf ".gpu/%s: %.1f MiB carried + %.1f MiB working tree + %.1f MiB shared/ = %.1f MiB (limit 64)\n",
               p, c / m, t / m, s / m, (c + t + s) / m }'
    [ $(( tree + shared + carried )) -lt "$LIMIT" ] || { echo ".gpu/$part: over the 64 MiB limit" >&2; exit 1; }
done
