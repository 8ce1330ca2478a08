package image

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// ReadLayoutTar returns the image index that a tar written by
// WriteLayoutTar holds, and the directory it was unpacked into, which the
// caller removes.
func ReadLayoutTar(tarPath string) (v1.ImageIndex, string, error) {
	dir, err := os.MkdirTemp("", "vfio-image-")
	if err != nil {
		return nil, "", err
	}
	fail := func(err error) (v1.ImageIndex, string, error) {
		_ = os.RemoveAll(dir)
		return nil, "", fmt.Errorf("image layout %s: %w", tarPath, err)
	}
	f, err := os.Open(tarPath)
	if err != nil {
		return fail(err)
	}
	defer func() { _ = f.Close() }()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fail(err)
		}
		clean := filepath.Clean(h.Name)
		if filepath.IsAbs(clean) || clean == ".." || strings.HasPrefix(clean, "../") {
			return fail(fmt.Errorf("entry %q is outside the layout", h.Name))
		}
		p := filepath.Join(dir, clean)
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				return fail(err)
			}
		case tar.TypeReg:
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return fail(err)
			}
			out, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o644)
			if err != nil {
				return fail(err)
			}
			_, err = io.Copy(out, tr)
			if cerr := out.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fail(err)
			}
		default:
			return fail(fmt.Errorf("entry %q has type %c, not a file or directory", h.Name, h.Typeflag))
		}
	}
	root, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		return fail(err)
	}
	im, err := root.IndexManifest()
	if err != nil {
		return fail(err)
	}
	if len(im.Manifests) != 1 {
		return fail(fmt.Errorf("index.json names %d images, want 1", len(im.Manifests)))
	}
	idx, err := root.ImageIndex(im.Manifests[0].Digest)
	if err != nil {
		return fail(err)
	}
	return idx, dir, nil
}

// Push pushes the image index of a layout tar to ref, with the credentials
// of the Docker config (~/.docker/config.json, as `docker login` writes it).
func Push(tarPath, ref string) (v1.Hash, error) {
	r, err := name.ParseReference(ref)
	if err != nil {
		return v1.Hash{}, fmt.Errorf("image reference %q: %w", ref, err)
	}
	idx, dir, err := ReadLayoutTar(tarPath)
	if err != nil {
		return v1.Hash{}, err
	}
	defer func() { _ = os.RemoveAll(dir) }()
	if err := remote.WriteIndex(r, idx, remote.WithAuthFromKeychain(authn.DefaultKeychain)); err != nil {
		return v1.Hash{}, fmt.Errorf("push %s: %w", ref, err)
	}
	return idx.Digest()
}
