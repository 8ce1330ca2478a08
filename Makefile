# Targets named in the README and issues are contracts: keep their names.
GO ?= go
GOLANGCI_LINT_VERSION ?= v2.15.0
BIN ?= $(CURDIR)/bin

.PHONY: all build test test-unit fuzz lint vet fmt-check demo e2e e2e-node test-vm bench clean image image-push chart-check manifests test-tools

# The image the chart installs by default: its repository and appVersion.
CHART := deployments/helm/vfio-dra-driver
VERSION ?= $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$$/\1/p' $(CHART)/Chart.yaml)
IMAGE_REPOSITORY ?= $(shell sed -n 's/^  repository: *//p' $(CHART)/values.yaml | head -n 1)
IMAGE ?= $(IMAGE_REPOSITORY):$(VERSION)
IMAGE_TAR ?= $(BIN)/vfio-dra-driver-image.tar

all: build

# grpcnotrace keeps gRPC from linking golang.org/x/net/trace, whose
# html/template looks methods up by name at run time: the linker then has to
# keep every exported method of every type that is put in an interface (all
# of client-go's typed clients, for one). Without it the plugin is 54 MB
# instead of 34 MB. The image build (tools/image, Dockerfile) uses the same tag.
GO_BUILD_FLAGS ?= -trimpath -tags=grpcnotrace -ldflags='-s -w'

build:
	$(GO) build $(GO_BUILD_FLAGS) -o $(BIN)/ ./cmd/...

## test: everything CI runs (unit tests with -race, fuzzing, lint, the real control plane, a real node, the real kernel).
test: lint test-unit fuzz test-tools chart-check e2e e2e-node test-vm

test-unit:
	$(GO) test -race -count=1 ./...

## fuzz: a short run of every fuzz target (FUZZTIME each); the committed
## corpora in testdata/fuzz also run in test-unit. A Fuzz function missing
## from FUZZ_TARGETS fails the target.
FUZZTIME ?= 6s
FUZZ_TARGETS = \
	./api/v1alpha1:FuzzDecodeDriverConfiguration \
	./api/v1alpha1:FuzzDecodeVfioConfig \
	./pkg/cdispec:FuzzEnvName \
	./pkg/cdispec:FuzzSpec \
	./pkg/checkpoint:FuzzDecode \
	./pkg/checkpoint:FuzzDecodeData \
	./pkg/checkpoint:FuzzDecodeExtras \
	./pkg/health:FuzzHealthFiles \
	./pkg/health:FuzzParseAERTotal \
	./pkg/pci:FuzzDeviceAttribute \
	./pkg/pci:FuzzParseAddress \
	./pkg/pci:FuzzParseDeviceName

fuzz:
	@found=$$(grep -rhoE '^func Fuzz[A-Za-z0-9_]+' --include='*_test.go' api pkg cmd | sed 's/^func //' | sort); \
	listed=$$(for t in $(FUZZ_TARGETS); do echo "$${t##*:}"; done | sort); \
	if [ "$$found" != "$$listed" ]; then echo "fuzz: FUZZ_TARGETS lists" $$listed "but the tests have" $$found; exit 1; fi
	@set -e; for t in $(FUZZ_TARGETS); do \
		echo "fuzz $${t%%:*} $${t##*:} for $(FUZZTIME)"; \
		$(GO) test -run='^$$' -fuzz="^$${t##*:}\$$" -fuzztime=$(FUZZTIME) "$${t%%:*}"; \
	done

## bench: benchmarks, each as a ratio against its floor measured in the same
## process (not part of make test; docs/benchmarks.md records the figures).
bench:
	$(GO) test -run '^$$' -bench . -count 1 ./...

vet:
	$(GO) vet ./...
	cd test/e2e && $(GO) vet ./...
	cd tools && $(GO) vet ./...

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

lint: vet fmt-check $(BIN)/golangci-lint
	$(BIN)/golangci-lint run ./...
	cd test/e2e && $(BIN)/golangci-lint run --config ../../.golangci.yml ./...
	cd tools && $(BIN)/golangci-lint run --config ../.golangci.yml ./...

$(BIN)/golangci-lint:
	GOBIN=$(BIN) $(GO) install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_LINT_VERSION)

## demo: build, then run the driver end to end on the demo node: a local control plane
## (built on first use, ~10 minutes), the kubelet plugin, a pod that gets the GPU.
demo: build
	./demo/run.sh

## e2e: real etcd, kube-apiserver, kube-scheduler and kube-controller-manager.
e2e: build
	./test/e2e/run.sh

## e2e-node: a real kubelet, containerd, runc and CNI start pods whose containers
## open their VFIO groups (kubelet and containerd built on first use, ~3 minutes).
e2e-node: build image
	VFIO_E2E_IMAGE_TAR=$(IMAGE_TAR) VFIO_E2E_IMAGE=$(IMAGE) ./test/e2e/run-node.sh

## test-vm: the bind path against a real kernel's vfio-pci under QEMU.
test-vm:
	./test/vm/run.sh

## test-tools: the image build (reproducible, both platforms, importable layout,
## Dockerfile equivalent), and the examples and the chart's ServiceMonitor decoded into their API types.
test-tools:
	cd tools && $(GO) test -count=1 -timeout 45m ./...

## image: the OCI image layout tar of the static plugin and CLI, linux/amd64 and
## linux/arm64, for `ctr images import` and `docker load`; no container engine.
image:
	cd tools && $(GO) run ./cmd/vfio-image build --repo .. --bin-dir $(BIN)/image \
		--name $(IMAGE) --version $(VERSION) --output $(IMAGE_TAR)

## image-push: push the image to IMAGE=registry/name:tag (credentials of docker login).
image-push: image
	cd tools && $(GO) run ./cmd/vfio-image push --input $(IMAGE_TAR) --image $(IMAGE)

## chart-check: helm lint and template (Helm 3 and 4) and deployments/kubernetes in sync.
chart-check:
	./deployments/helm/chart.sh check

## manifests: render deployments/kubernetes from the chart.
manifests:
	./deployments/helm/chart.sh render

clean:
	rm -rf $(BIN) test/vm/out
