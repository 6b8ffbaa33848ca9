#pragma once

// Memory accounting: resident set size of this process, for reports next to every speed figure.

#include <cstdint>
#include <string>

namespace seedling {

// Peak resident set size of this process so far (Linux VmHWM), in bytes; 0 if unknown.
int64_t PeakRssBytes();

// Current resident set size (Linux VmRSS), in bytes; 0 if unknown.
int64_t CurrentRssBytes();

// Resets the peak RSS counter to the current RSS where the kernel allows it (Linux: writes "5" to
// /proc/self/clear_refs). Returns false if it could not.
bool ResetPeakRss();

// "1.50 GiB", "12.0 MiB", "512 B".
std::string FormatBytes(int64_t bytes);

}  // namespace seedling
