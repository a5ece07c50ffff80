#!/bin/bash
# usage: matrix.sh "<mode> <cfg> [extra args]" ...   -> runs torchrun 2 ranks and reports wall + result
. /tmp/dsvenv/bin/activate
D=/work/main/.scratch_ds
port=29600
for spec in "$@"; do
  set -- $spec; mode=$1; cfg=$2; shift 2; extra="$*"
  port=$((port+1))
  dsarg=""; [ "$cfg" != none ] && dsarg="--ds $D/ds_$cfg.json"
  log=/tmp/m_${mode}_${cfg}_$(echo $extra | tr -d ' -').log
  s=$(date +%s.%N)
  timeout 600 torchrun --nproc_per_node 2 --master_port $port $D/train.py --mode $mode $dsarg $extra > $log 2>&1
  rc=$?
  e=$(date +%s.%N)
  res=$(grep -h "train() took" $log | head -1 | sed 's/.*train()/train()/')
  printf "%-6s %-14s %-22s rc=%s wall=%.1fs  %s\n" $mode $cfg "$extra" $rc $(echo "$e - $s" | bc) "$res"
  [ $rc != 0 ] && grep -iE "error|exception|Traceback" $log | head -5
done
