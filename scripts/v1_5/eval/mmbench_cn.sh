#!/bin/bash
# MMBench-CN dev: mmbench.sh on the Chinese split, with the Chinese prompt.
SPLIT=${SPLIT:-mmbench_dev_cn_20231003} BENCH=mmbench_cn exec bash "$(dirname "$0")/mmbench.sh" "$@"
