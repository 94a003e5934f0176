# mpilm build. `make` probes the dependencies, prints what it found and builds
# build/mpilm. Targets: deps all test demo bench install clean (see README).

PREFIX  ?= /usr/local
BUILD   ?= build
MPICC   ?= mpicc
NVCC    ?= $(firstword $(wildcard /usr/local/cuda/bin/nvcc) $(shell command -v nvcc 2>/dev/null))
NO_CUDA ?=

# OpenBLAS built for OpenMP, so BLAS calls share the OpenMP thread pool of
# the fused kernels (and run single-threaded inside a parallel region)
# instead of a second pool of spinning pthreads competing for the same cores.
BLAS_DIR := /usr/lib/x86_64-linux-gnu/openblas-openmp
PKG_BLAS := $(shell test -e $(BLAS_DIR)/libopenblas.so && echo openblas-openmp)
PKG_H5   := $(shell pkg-config --exists hdf5-openmpi 2>/dev/null && echo hdf5-openmpi)
PKG_YAML := $(shell pkg-config --exists yaml-0.1 2>/dev/null && echo yaml-0.1)
PKG_CMK  := $(shell pkg-config --exists cmocka 2>/dev/null && echo cmocka)
PKG_MHD  := $(shell pkg-config --exists libmicrohttpd 2>/dev/null && echo libmicrohttpd)
HAVE_MPICC := $(shell command -v $(MPICC) >/dev/null 2>&1 && echo yes)

WERROR  ?= -Werror
CFLAGS  ?= -O3 -march=x86-64-v3 -mtune=native -g
# format-truncation: messages are cut to their buffers on purpose
# no-trapping-math, no-math-errno: lets the float loops vectorize; no reassociation,
# so results stay bit-reproducible
CFLAGS  += -std=gnu11 -Wall -Wextra $(WERROR) -Wno-format-truncation -fopenmp -D_GNU_SOURCE \
           -fno-trapping-math -fno-math-errno
CPPFLAGS += -I. -I/usr/include/x86_64-linux-gnu/openblas-openmp \
            $(if $(PKG_H5),$(shell pkg-config --cflags hdf5-openmpi))
LDLIBS  += $(if $(PKG_H5),$(shell pkg-config --libs hdf5-openmpi)) \
           -L$(BLAS_DIR) -Wl,-rpath,$(BLAS_DIR) -lopenblas -lyaml -lmicrohttpd -lpthread -lm -fopenmp

LIB_SRC := $(sort $(wildcard src/*.c kernels/cpu/*.c comm/*.c io/*.c bench/*.c))
LIB_SRC := $(filter-out src/main.c $(EXCLUDE),$(LIB_SRC))
LIB_OBJ := $(LIB_SRC:%.c=$(BUILD)/obj/%.o)
UNIT_SRC := $(sort $(wildcard tests/unit/test_*.c))
MPI_SRC  := $(sort $(wildcard tests/mpi/test_*.c))
TEST_BIN := $(UNIT_SRC:%.c=$(BUILD)/%) $(MPI_SRC:%.c=$(BUILD)/%)

.PHONY: all probe deps test demo bench install clean format
all: probe $(BUILD)/mpilm

probe:
	@echo "mpilm build configuration:"
	@echo "  mpicc     : $(if $(HAVE_MPICC),$(shell command -v $(MPICC)) ($(shell $(MPICC) --showme:version 2>/dev/null | head -1)),MISSING - run 'make deps')"
	@echo "  HDF5      : $(if $(PKG_H5),parallel (hdf5-openmpi $(shell pkg-config --modversion hdf5-openmpi)),MISSING - run 'make deps')"
	@echo "  BLAS      : $(if $(PKG_BLAS),OpenBLAS (OpenMP build, $(BLAS_DIR)),MISSING - run 'make deps')"
	@echo "  libyaml   : $(if $(PKG_YAML),$(shell pkg-config --modversion yaml-0.1),MISSING - run 'make deps')"
	@echo "  libmicrohttpd: $(if $(PKG_MHD),$(shell pkg-config --modversion libmicrohttpd),MISSING - run 'make deps')"
	@echo "  CMocka    : $(if $(PKG_CMK),$(shell pkg-config --modversion cmocka),missing (needed by 'make test'))"
	@echo "  nvcc/NCCL : $(if $(NO_CUDA),disabled (NO_CUDA=1),$(if $(NVCC),$(NVCC) found; this build has no CUDA kernels yet,not found))"
	@test -n "$(HAVE_MPICC)" -a -n "$(PKG_H5)" -a -n "$(PKG_BLAS)" -a -n "$(PKG_YAML)" -a -n "$(PKG_MHD)" || \
	  { echo "error: missing dependencies; run 'make deps' (Debian, root or sudo)"; exit 1; }

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(MPICC) $(CPPFLAGS) $(CFLAGS) -MMD -MP -c $< -o $@

$(BUILD)/libmpilm.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/mpilm: $(BUILD)/obj/src/main.o $(BUILD)/libmpilm.a
	$(MPICC) $(CFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/tests/%: tests/%.c $(BUILD)/libmpilm.a
	@mkdir -p $(dir $@)
	$(MPICC) $(CPPFLAGS) $(CFLAGS) -o $@ $< $(BUILD)/libmpilm.a $(LDLIBS) -lcmocka

tests-build: all $(TEST_BIN)

deps:
	@bash tools/deps.sh

test: tests-build
	@bash tests/run.sh

demo: deps
	@$(MAKE) --no-print-directory all
	@bash tools/demo.sh

bench: all
	@bash bench/run.sh

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/mpilm/jobs
	install -m 755 $(BUILD)/mpilm $(DESTDIR)$(PREFIX)/bin/mpilm
	install -m 644 jobs/*.yaml $(DESTDIR)$(PREFIX)/share/mpilm/jobs/

clean:
	rm -rf $(BUILD)

format:
	clang-format -i $(LIB_SRC) src/main.c $(UNIT_SRC) $(MPI_SRC) $(wildcard */*.h kernels/cpu/*.h)

-include $(shell find $(BUILD)/obj -name '*.d' 2>/dev/null)
