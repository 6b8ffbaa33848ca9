// A program built against an installed Seedling (examples/consumer/CMakeLists.txt): it reads a client
// config through the C++ API and through the C interface, and prints what each said.
//
//   consumer '<config json>'
#include <cstdio>
#include <string>

#include "base/version.h"
#include "client/client_config.h"
#include "client/seedling_client.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s '<client config json>'\n", argv[0]);
    return 2;
  }
  std::printf("%s\n", seedling::kVersionString);
  auto config = seedling::client::ClientConfig::FromJson(argv[1]);
  std::printf("c++: %s\n", config.ok() ? ("ok, device " + config->device_id).c_str()
                                       : std::string(config.status().message()).c_str());
  char err[512] = "";
  seedling_client* client = seedling_client_create(argv[1], err, sizeof err);
  std::printf("c: %s\n", client != nullptr ? "created" : err);
  if (client != nullptr) seedling_client_destroy(client);
  return config.ok() && client != nullptr ? 0 : 1;
}
