r"""`ray job submit` entrypoint: train the DCGAN with Ray Train (resumes from its
last checkpoint). Same flags as `deepfake-ray train-gan`, plus --run-name (outputs in
WORKDIR/RUN_NAME).

E.g.
  ray job submit --address http://HEAD:8265 --working-dir . \
    --runtime-env jobs/runtime_env.yaml -- python jobs/train_gan.py --preset celeb100k --workdir s3://BUCKET/runs --run-name r1
"""
import sys

import _entry

if __name__ == "__main__":
    sys.exit(_entry.main("train-gan", "train_gan.py", description=__doc__))
