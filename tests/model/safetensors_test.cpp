#include <catch2/catch.hpp>
// Placeholder: being written (issue 2).
