// Package image builds the driver's container image without a container
// engine: a multi-platform OCI image index of static binaries, written as an
// OCI image layout in a tar file that `ctr images import`, `docker load`
// and registries (through Push) take.
//
// The build is reproducible: every timestamp is the Unix epoch, every owner
// root, every entry sorted, so the same binaries give the same digests.
package image

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Binaries are the files of the image, each installed in /usr/bin.
var Binaries = []string{"vfio-kubelet-plugin", "vfio-dra"}

// Entrypoint is what the container runs; the chart passes only arguments.
var Entrypoint = []string{"/usr/bin/vfio-kubelet-plugin"}

// Platforms the image is built for.
var Platforms = []v1.Platform{{OS: "linux", Architecture: "amd64"}, {OS: "linux", Architecture: "arm64"}}

// epoch is the time of every file, layer and config: the build's inputs,
// not the clock, decide the digest.
var epoch = time.Unix(0, 0).UTC()

// Options describe one build.
type Options struct {
	// Name is the image reference the layout is tagged with, e.g.
	// ghcr.io/vfio-dra/vfio-dra-driver:v0.1.0.
	Name string
	// Version goes into the org.opencontainers.image.version label.
	Version string
	// BinDir holds <os>_<arch>/<binary> for every platform and binary.
	BinDir string
}

// Build returns the image index of every platform.
func Build(o Options) (v1.ImageIndex, error) {
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	for _, p := range Platforms {
		img, err := platformImage(o, p)
		if err != nil {
			return nil, fmt.Errorf("image for %s/%s: %w", p.OS, p.Architecture, err)
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{
			Add:        img,
			Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: p.OS, Architecture: p.Architecture}},
		})
	}
	return idx, nil
}

func platformImage(o Options, p v1.Platform) (v1.Image, error) {
	dir := filepath.Join(o.BinDir, p.OS+"_"+p.Architecture)
	files := map[string][]byte{}
	for _, b := range Binaries {
		data, err := os.ReadFile(filepath.Join(dir, b))
		if err != nil {
			return nil, err
		}
		files["usr/bin/"+b] = data
	}
	layerTar, err := tarFiles(files)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, err
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.ConfigFile(img, &v1.ConfigFile{
		Architecture: p.Architecture,
		OS:           p.OS,
		Created:      v1.Time{Time: epoch},
		Config: v1.Config{
			Entrypoint: Entrypoint,
			Env:        []string{"PATH=/usr/bin"},
			Labels: map[string]string{
				"org.opencontainers.image.source":  "https://github.com/vfio-dra/vfio-dra-driver",
				"org.opencontainers.image.title":   "vfio-dra-driver",
				"org.opencontainers.image.version": o.Version,
			},
		},
		RootFS: v1.RootFS{Type: "layers"},
	})
	if err != nil {
		return nil, err
	}
	return mutate.Append(img, mutate.Addendum{
		Layer:   layer,
		History: v1.History{Created: v1.Time{Time: epoch}, CreatedBy: "vfio-dra-driver make image", Comment: "static binaries in /usr/bin"},
	})
}

// tarFiles is a tar of files (path -> content), executables owned by root,
// with their parent directories, in a fixed order.
func tarFiles(files map[string][]byte) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	names := slices.Sorted(func(yield func(string) bool) {
		for n := range files {
			if !yield(n) {
				return
			}
		}
	})
	dirs := map[string]bool{}
	for _, n := range names {
		var parents []string
		for d := path.Dir(n); d != "."; d = path.Dir(d) {
			parents = append([]string{d}, parents...)
		}
		for _, d := range parents {
			if dirs[d] {
				continue
			}
			dirs[d] = true
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX}); err != nil {
				return nil, err
			}
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: n, Mode: 0o755, Size: int64(len(files[n])), ModTime: epoch, Format: tar.FormatPAX}); err != nil {
			return nil, err
		}
		if _, err := tw.Write(files[n]); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// dockerManifest is one entry of manifest.json, the index `docker load`
// reads when it does not read OCI layouts.
type dockerManifest struct {
	Config   string
	RepoTags []string
	Layers   []string
}

// WriteLayoutTar writes idx as an OCI image layout tar to out: oci-layout,
// index.json naming the image (io.containerd.image.name, for ctr and docker;
// org.opencontainers.image.ref.name, the tag) and the blobs, plus a
// manifest.json for the dockerPlatform image so that older `docker load`
// takes it too.
func WriteLayoutTar(out string, idx v1.ImageIndex, name, tag string, dockerPlatform v1.Platform) error {
	dir, err := os.MkdirTemp("", "vfio-image-")
	if err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(dir) }()
	lp, err := layout.Write(dir, empty.Index)
	if err != nil {
		return err
	}
	if err := lp.AppendIndex(idx, layout.WithAnnotations(map[string]string{
		"io.containerd.image.name":          name,
		"org.opencontainers.image.ref.name": tag,
	})); err != nil {
		return err
	}
	dm, err := dockerManifestFor(idx, name, dockerPlatform)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "manifest.json"), dm, 0o644); err != nil {
		return err
	}
	return tarDir(out, dir)
}

func dockerManifestFor(idx v1.ImageIndex, name string, p v1.Platform) ([]byte, error) {
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, err
	}
	for _, d := range im.Manifests {
		if d.Platform == nil || d.Platform.OS != p.OS || d.Platform.Architecture != p.Architecture {
			continue
		}
		img, err := idx.Image(d.Digest)
		if err != nil {
			return nil, err
		}
		cfg, err := img.ConfigName()
		if err != nil {
			return nil, err
		}
		layers, err := img.Layers()
		if err != nil {
			return nil, err
		}
		m := dockerManifest{Config: blobPath(cfg), RepoTags: []string{name}}
		for _, l := range layers {
			h, err := l.Digest()
			if err != nil {
				return nil, err
			}
			m.Layers = append(m.Layers, blobPath(h))
		}
		return json.Marshal([]dockerManifest{m})
	}
	return nil, fmt.Errorf("the image has no %s/%s platform for manifest.json", p.OS, p.Architecture)
}

func blobPath(h v1.Hash) string { return path.Join("blobs", h.Algorithm, h.Hex) }

// tarDir writes the tree under dir to the tar file out, sorted, with fixed
// times and owners.
func tarDir(out, dir string) error {
	var paths []string
	if err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != dir {
			paths = append(paths, p)
		}
		return nil
	}); err != nil {
		return err
	}
	slices.Sort(paths)
	tmp := out + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	defer func() { _ = os.Remove(tmp) }()
	tw := tar.NewWriter(f)
	for _, p := range paths {
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		st, err := os.Stat(p)
		if err != nil {
			return err
		}
		if st.IsDir() {
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: rel + "/", Mode: 0o755, ModTime: epoch}); err != nil {
				return err
			}
			continue
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: rel, Mode: 0o644, Size: st.Size(), ModTime: epoch}); err != nil {
			return err
		}
		src, err := os.Open(p)
		if err != nil {
			return err
		}
		_, err = io.Copy(tw, src)
		_ = src.Close()
		if err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, out)
}
