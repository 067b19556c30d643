# Sourced by bench/instructions.sh and bench/wal.sh: the daemon's config for a benchmark of
# upgate alone (the local provider, one tenant `bench` with key `bench-key`).
#
#   upgate_bench_config FILE LISTEN METRICS_LISTEN DATA_DIR PLUGIN_DIR MAX_FILE_SIZE
#
# METRICS_LISTEN may be `null` (no metrics listener). The files go to DATA_DIR/files.
upgate_bench_config() {
    local file=$1 listen=$2 metrics=$3 data=$4 plugins=$5 max=$6
    cat >"$file" <<YAML
server:
  listen: $listen
  metrics_listen: $metrics
  data_dir: $data
  plugin_dir: $plugins
  log_format: text
  disk_free_floor: 1MiB
plans:
  bench: { max_file_size: $max }
providers:
  disk: { plugin: local, settings: { root: $data/files } }
tenants:
  bench: { plan: bench, provider: disk, keys: [bench-key] }
YAML
}
