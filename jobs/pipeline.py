r"""`ray job submit` entrypoint: every stage in order (prepare, train-gan,
generate, train-detector or tune, evaluate, score, report); complete stages are skipped.
Same flags as `deepfake-ray pipeline`, plus --run-name (outputs in WORKDIR/RUN_NAME).

E.g.
  ray job submit --address http://HEAD:8265 --working-dir . \
    --runtime-env jobs/runtime_env.yaml -- python jobs/pipeline.py --preset celeb100k --workdir s3://BUCKET/runs --run-name r1
"""
import sys

import _entry

if __name__ == "__main__":
    sys.exit(_entry.main("pipeline", "pipeline.py", description=__doc__))
