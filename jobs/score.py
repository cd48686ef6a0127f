r"""`ray job submit` entrypoint: score a folder, bucket or manifest with an
exported detector into a Parquet or CSV table. Same flags as `deepfake-ray score`. Give
--model, --input and --out as s3:// URIs (or paths every node shares): a relative path
would be in the job's own copy of the code.

E.g.
  ray job submit --address http://HEAD:8265 --working-dir . \
    --runtime-env jobs/runtime_env.yaml -- python jobs/score.py --preset celeb100k \
       --model s3://BUCKET/runs/r1/detector/model --input s3://BUCKET/incoming/ \
       --out s3://BUCKET/scores/incoming.parquet
"""
import sys

import _entry

if __name__ == "__main__":
    sys.exit(_entry.main("score", "score.py", description=__doc__))
