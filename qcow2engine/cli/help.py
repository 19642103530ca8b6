"""`qcow2engine --help` and `qcow2engine VERB --help`: one text, as qemu-img prints one."""

HELP = """\
usage: qcow2engine [--state-dir DIR] command [command options]
qcow2 backing-chain engine: qemu-img's image verbs, virsh's machine snapshot verbs

Image commands (qemu-img 7.2 syntax; options may follow the operands, `--` ends them):
  amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename
  bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename
  check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename
  commit [--object objectdef] [--image-opts] [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename
  compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2
  convert [--object objectdef] [--image-opts] [--target-image-opts] [--target-is-zero] [-U] [-C] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] [-B backing_file -F backing_fmt] [-o options] [-l snapshot_param] [-S sparse_size] [-r rate_limit] [-m num_coroutines] [-W] [--salvage] [--bitmaps [--skip-broken-bitmaps]] filename [filename2 [...]] output_filename
  create [--object objectdef] [-q] [-f fmt] [-b backing_file -F backing_fmt] [-u] [-o options] filename [size]
  dd [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output
  info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename
  map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename
  measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [--object objectdef] [--image-opts] [-f fmt] [-l snapshot_param] filename]
  snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename
  rebase [--object objectdef] [--image-opts] [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename
  resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size
  stream [-b base] [-p] [-q] filename
  io [-f fmt] [-r] [-U] -c command [-c command ...] filename

Machine commands (virsh's verbs and output; see README.md):
  machine create|list|show|suspend|resume|recover|check|delete ...
  snapshot-create-as, snapshot-list [--tree], snapshot-info, snapshot-current,
  snapshot-parent, snapshot-revert, snapshot-delete
  live ...   (a running QEMU over QMP)

Formats written: qcow2, raw ('file' is raw).  Filenames: a path, file:PATH,
json:{"driver":"qcow2","file":{"driver":"file","filename":PATH}}, or with --image-opts
driver=qcow2,file.filename=PATH; null-co:// as a convert -n target.
'cache' and 'src_cache' are accepted (none, writeback, writethrough, directsync,
unsafe) and change nothing: every write here is ordered for crash safety.
"""


def print_help() -> int:
    import sys
    sys.stdout.write(HELP)
    return 0
