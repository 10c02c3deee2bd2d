// Temporary files and folders the tool writes before renaming them into place (io::OutputDir,
// io::OutputFile, the statistics a run collects on the fly). Two guarantees:
// - SIGINT, SIGTERM and SIGHUP remove every registered temporary before the process dies
//   (the handler uses async-signal-safe system calls only, then re-raises the signal);
// - temporaries are named NAME.moe-tool-tmp-PID-NONCE, so a later run into the same place can
//   tell those of a process that is gone (kill -9, power loss) and remove them.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

namespace moe::io {

namespace fs = std::filesystem;

// A unique temporary name for `target` in folder `dir`: ".NAME.moe-tool-tmp-PID-NONCE" (hidden) or,
// with hidden = false, "NAME.moe-tool-tmp-PID-NONCE". Unique per process and per call.
fs::path temp_name(const fs::path& dir, const std::string& name, bool hidden = true);

// Registers `path` for removal on SIGINT/SIGTERM/SIGHUP (installs the handlers on first use).
// Returns a slot id for unregister_temp(); at most 64 temporaries at once (the rest are not
// registered: still removed on failure by their owners, only not on a signal).
int register_temp(const fs::path& path);
void unregister_temp(int slot);

// Removes the temporaries of processes that are gone in `dir` whose name starts with `prefix`
// (e.g. ".out.moe-tool-tmp-" or "moe-tool-stats.safetensors.moe-tool-tmp-"); returns what it
// removed. Temporaries of live processes are left alone.
std::vector<fs::path> remove_stale_temps(const fs::path& dir, const std::string& prefix);

// The prefix temp_name() uses for `name` (for remove_stale_temps).
std::string temp_prefix(const std::string& name, bool hidden = true);

}  // namespace moe::io
