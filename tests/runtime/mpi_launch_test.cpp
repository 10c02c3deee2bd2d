// The launcher variables runtime/mpi.h reads (OpenMPI's mpirun, MPICH/Hydra and Slurm's PMI,
// PMIx), and the refusal of a build without MPI started as several ranks. In a build with MPI that
// refusal cannot happen (World::init starts MPI): tests/mpi runs the ranks there.
#include <gtest/gtest.h>

#include <cstdlib>
#include <optional>
#include <string>

#include "core/error.h"
#include "runtime/mpi.h"
#include "support/expect_error.h"

namespace moe::test {
namespace {

using runtime::mpi::launch_env;

// Sets launcher variables for one test and restores the environment after.
class LaunchVars {
 public:
  LaunchVars() {
    for (const char* v : kVars) {
      const char* old = std::getenv(v);
      saved_.push_back(old ? std::optional<std::string>(old) : std::nullopt);
      unsetenv(v);
    }
  }
  ~LaunchVars() {
    for (size_t i = 0; i < std::size(kVars); ++i) {
      if (saved_[i]) setenv(kVars[i], saved_[i]->c_str(), 1);
      else unsetenv(kVars[i]);
    }
  }
  void set(const char* name, const char* value) { setenv(name, value, 1); }

 private:
  static constexpr const char* kVars[] = {"OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_SIZE",
                                          "PMI_RANK", "PMIX_SIZE", "PMIX_RANK"};
  std::vector<std::optional<std::string>> saved_;
};

TEST(MpiLaunch, ReadsTheLaunchersVariables) {
  LaunchVars env;
  EXPECT_FALSE(launch_env().launched);
  EXPECT_EQ(launch_env().size, 1);
  env.set("PMI_SIZE", "4");
  env.set("PMI_RANK", "3");
  EXPECT_TRUE(launch_env().launched);
  EXPECT_EQ(launch_env().size, 4);
  EXPECT_EQ(launch_env().rank, 3);
  env.set("OMPI_COMM_WORLD_SIZE", "2");  // OpenMPI's first
  env.set("OMPI_COMM_WORLD_RANK", "1");
  EXPECT_EQ(launch_env().size, 2);
  EXPECT_EQ(launch_env().rank, 1);
}

TEST(MpiLaunch, PmixRankAloneIsALaunch) {
  LaunchVars env;
  env.set("PMIX_RANK", "0");
  EXPECT_TRUE(launch_env().launched);
  EXPECT_EQ(launch_env().rank, 0);
}

TEST(MpiLaunch, MalformedVariableIsRefused) {
  LaunchVars env;
  env.set("OMPI_COMM_WORLD_SIZE", "two");
  expect_error([] { launch_env(); }, core::ErrorKind::InvalidArgument,
               {"environment variable OMPI_COMM_WORLD_SIZE=\"two\"", "expected a rank or rank count"});
}

TEST(MpiLaunch, BuildWithoutMpiRefusesSeveralRanks) {
#ifdef MOE_TOOL_HAVE_MPI
  GTEST_SKIP() << "this build has MPI (tests/mpi runs it under mpiexec)";
#else
  LaunchVars env;
  runtime::mpi::World& w = runtime::mpi::World::get();
  w.init(nullptr, nullptr);  // no launcher: one process
  EXPECT_EQ(w.size(), 1);
  env.set("OMPI_COMM_WORLD_SIZE", "1");  // a launch of one rank runs as one process too
  w.init(nullptr, nullptr);
  EXPECT_EQ(w.size(), 1);
  env.set("OMPI_COMM_WORLD_SIZE", "3");
  expect_error([&] { w.init(nullptr, nullptr); }, core::ErrorKind::InvalidArgument,
               {"built without MPI but was started as one of 3 ranks", "install libopenmpi-dev",
                "reconfigure and rebuild"});
  EXPECT_EQ(w.size(), 1);
#endif
}

}  // namespace
}  // namespace moe::test
