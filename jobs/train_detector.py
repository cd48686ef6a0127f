r"""`ray job submit` entrypoint: fine-tune the detector with Ray Train (resumes
from its last checkpoint). Same flags as `deepfake-ray train-detector`, plus --run-name
(outputs in WORKDIR/RUN_NAME).

E.g.
  ray job submit --address http://HEAD:8265 --working-dir . \
    --runtime-env jobs/runtime_env.yaml -- python jobs/train_detector.py --preset celeb100k --workdir s3://BUCKET/runs --run-name r1
"""
import sys

import _entry

if __name__ == "__main__":
    sys.exit(_entry.main("train-detector", "train_detector.py", description=__doc__))
