# The same image as `make image` (tools/image), for those who build with
# Docker: static binaries built with the same flags, in /usr/bin of an empty
# base, the plugin as entrypoint. `make image` needs no container engine and
# is reproducible; prefer it.
#
#   docker buildx build --platform linux/amd64,linux/arm64 -t ghcr.io/vfio-dra/vfio-dra-driver:v0.1.0 .
FROM --platform=$BUILDPLATFORM golang:1.26 AS build
ARG TARGETOS TARGETARCH
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY api/ api/
COPY cmd/ cmd/
COPY pkg/ pkg/
RUN for b in vfio-kubelet-plugin vfio-dra; do \
      CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
        go build -trimpath -buildvcs=false -tags=grpcnotrace -ldflags="-s -w -buildid=" -o /out/usr/bin/$b ./cmd/$b || exit 1; \
    done

FROM scratch
COPY --from=build /out/usr/bin/ /usr/bin/
ENV PATH=/usr/bin
LABEL org.opencontainers.image.source="https://github.com/vfio-dra/vfio-dra-driver" \
      org.opencontainers.image.title="vfio-dra-driver"
ENTRYPOINT ["/usr/bin/vfio-kubelet-plugin"]
