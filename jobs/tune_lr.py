r"""`ray job submit` entrypoint: sweep the detector learning rate with Ray Tune
(ASHA). Same flags as `deepfake-ray tune`, plus --run-name (outputs in WORKDIR/RUN_NAME).

E.g.
  ray job submit --address http://HEAD:8265 --working-dir . \
    --runtime-env jobs/runtime_env.yaml -- python jobs/tune_lr.py --preset celeb100k --workdir s3://BUCKET/runs --run-name r1
"""
import sys

import _entry

if __name__ == "__main__":
    sys.exit(_entry.main("tune", "tune_lr.py", description=__doc__))
