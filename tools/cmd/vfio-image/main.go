// Command vfio-image builds the driver's OCI image from static binaries
// (make image) and pushes it (make image-push).
//
//	vfio-image build --repo .. --bin-dir bin/image --name REF --version V --output bin/vfio-dra-driver-image.tar
//	vfio-image push --input bin/vfio-dra-driver-image.tar --image REF
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/vfio-dra/vfio-dra-driver/tools/image"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "vfio-image:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("usage: vfio-image build|push [flags]")
	}
	fs := flag.NewFlagSet(args[0], flag.ContinueOnError)
	switch args[0] {
	case "build":
		binDir := fs.String("bin-dir", "bin/image", "directory for <os>_<arch>/<binary> of every platform")
		repo := fs.String("repo", "..", "the driver's module, whose binaries are built")
		ref := fs.String("name", "", "image reference the layout is tagged with")
		version := fs.String("version", "", "image version label")
		output := fs.String("output", "", "OCI layout tar to write")
		docker := fs.String("docker-platform", "linux/amd64", "platform of the manifest.json entry for docker load")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		if *ref == "" || *output == "" {
			return fmt.Errorf("build: --name and --output are required")
		}
		osName, arch, ok := strings.Cut(*docker, "/")
		if !ok {
			return fmt.Errorf("build: --docker-platform %q is not os/arch", *docker)
		}
		if err := image.Compile(context.Background(), "go", *repo, *binDir); err != nil {
			return err
		}
		idx, err := image.Build(image.Options{Name: *ref, Version: *version, BinDir: *binDir})
		if err != nil {
			return err
		}
		tag := *ref
		if i := strings.LastIndex(tag, ":"); i > strings.LastIndex(tag, "/") {
			tag = tag[i+1:]
		}
		if err := image.WriteLayoutTar(*output, idx, *ref, tag, v1.Platform{OS: osName, Architecture: arch}); err != nil {
			return err
		}
		d, err := idx.Digest()
		if err != nil {
			return err
		}
		fmt.Printf("%s %s@%s\n", *output, *ref, d)
		return nil
	case "push":
		input := fs.String("input", "", "OCI layout tar written by build")
		ref := fs.String("image", "", "where to push, e.g. registry.example.com/vfio-dra-driver:v0.1.0")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		if *input == "" || *ref == "" {
			return fmt.Errorf("push: --input and --image are required")
		}
		d, err := image.Push(*input, *ref)
		if err != nil {
			return err
		}
		fmt.Printf("pushed %s@%s\n", *ref, d)
		return nil
	default:
		return fmt.Errorf("unknown command %q: want build or push", args[0])
	}
}
