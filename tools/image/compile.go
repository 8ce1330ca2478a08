package image

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// GoBuildFlags are the flags every binary of the image is built with: no
// paths of the build machine, no VCS stamp (a dirty tree would change the
// digest), no build ID, and gRPC without golang.org/x/net/trace
// (grpcnotrace, see the Makefile: it lets the linker drop unused methods).
// The Dockerfile uses the same.
var GoBuildFlags = []string{"-trimpath", "-buildvcs=false", "-tags=grpcnotrace", "-ldflags=-s -w -buildid="}

// Compile builds the image's binaries from the driver module in repo for
// every platform into binDir/<os>_<arch>/, static (CGO_ENABLED=0).
func Compile(ctx context.Context, goCmd, repo, binDir string) error {
	for _, p := range Platforms {
		out := filepath.Join(binDir, p.OS+"_"+p.Architecture)
		for _, b := range Binaries {
			args := append([]string{"build"}, GoBuildFlags...)
			args = append(args, "-o", filepath.Join(out, b), "./cmd/"+b)
			cmd := exec.CommandContext(ctx, goCmd, args...)
			cmd.Dir = repo
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS="+p.OS, "GOARCH="+p.Architecture, "GOFLAGS=")
			if out, err := cmd.CombinedOutput(); err != nil {
				return fmt.Errorf("go %s (%s/%s): %w\n%s", strings.Join(args, " "), p.OS, p.Architecture, err, out)
			}
		}
	}
	return nil
}
