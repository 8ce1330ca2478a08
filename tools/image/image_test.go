package image_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/vfio-dra/vfio-dra-driver/tools/image"
)

const name = "ghcr.io/vfio-dra/vfio-dra-driver:v0.1.0"

// build compiles the driver and writes the layout tar into a fresh
// directory; it returns the tar's path and the index digest.
func build(t *testing.T) (string, v1.Hash) {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	if err := image.Compile(t.Context(), "go", "../..", bin); err != nil {
		t.Fatal(err)
	}
	idx, err := image.Build(image.Options{Name: name, Version: "v0.1.0", BinDir: bin})
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "image.tar")
	if err := image.WriteLayoutTar(out, idx, name, "v0.1.0", v1.Platform{OS: "linux", Architecture: "amd64"}); err != nil {
		t.Fatal(err)
	}
	d, err := idx.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return out, d
}

func fileHash(t *testing.T, p string) [32]byte {
	t.Helper()
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(data)
}

// TestReproducible: two builds from the same sources, each compiling the
// binaries into its own directory, give the same index digest and the same
// tar, byte for byte.
func TestReproducible(t *testing.T) {
	a, da := build(t)
	b, db := build(t)
	if da != db {
		t.Errorf("index digests differ: %s and %s", da, db)
	}
	if fileHash(t, a) != fileHash(t, b) {
		t.Errorf("the two layout tars differ")
	}
}

// untar returns the tar's regular files by name, and its entry names.
func untar(t *testing.T, p string) (map[string][]byte, []string) {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	files := map[string][]byte{}
	var names []string
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		if h.ModTime.Unix() != 0 || h.Uid != 0 || h.Gid != 0 {
			t.Errorf("%s: time %v owner %d:%d, want the epoch and root", h.Name, h.ModTime, h.Uid, h.Gid)
		}
		if h.Typeflag == tar.TypeReg {
			data, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			files[h.Name] = data
		}
	}
	return files, names
}

// TestLayout: the tar is an OCI layout that ctr and docker import: it names
// the image, holds an index of both platforms whose images run the plugin
// from static binaries of the right architecture, and a manifest.json for
// docker load; and ReadLayoutTar (what image-push sends) gets the same index.
func TestLayout(t *testing.T) {
	out, digest := build(t)
	files, _ := untar(t, out)
	if !bytes.Contains(files["oci-layout"], []byte(`"imageLayoutVersion"`)) {
		t.Errorf("oci-layout is %q", files["oci-layout"])
	}
	var top v1.IndexManifest
	if err := json.Unmarshal(files["index.json"], &top); err != nil {
		t.Fatalf("index.json: %v", err)
	}
	if len(top.Manifests) != 1 {
		t.Fatalf("index.json has %d manifests, want 1", len(top.Manifests))
	}
	root := top.Manifests[0]
	if root.Digest != digest || root.MediaType != "application/vnd.oci.image.index.v1+json" {
		t.Errorf("index.json names %s %s, want the image index %s", root.MediaType, root.Digest, digest)
	}
	if root.Annotations["io.containerd.image.name"] != name || root.Annotations["org.opencontainers.image.ref.name"] != "v0.1.0" {
		t.Errorf("index.json annotations %v do not name %s", root.Annotations, name)
	}
	blob := func(h v1.Hash) []byte {
		t.Helper()
		data, ok := files["blobs/"+h.Algorithm+"/"+h.Hex]
		if !ok {
			t.Fatalf("blob %s is missing", h)
		}
		if got := sha256.Sum256(data); h.Algorithm != "sha256" || hexOf(got) != h.Hex {
			t.Fatalf("blob %s has digest %x", h, got)
		}
		return data
	}
	var idx v1.IndexManifest
	if err := json.Unmarshal(blob(digest), &idx); err != nil {
		t.Fatal(err)
	}
	var platforms []string
	machine := map[string]elf.Machine{"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64}
	for _, m := range idx.Manifests {
		platforms = append(platforms, m.Platform.OS+"/"+m.Platform.Architecture)
		var mf v1.Manifest
		if err := json.Unmarshal(blob(m.Digest), &mf); err != nil {
			t.Fatal(err)
		}
		var cfg v1.ConfigFile
		if err := json.Unmarshal(blob(mf.Config.Digest), &cfg); err != nil {
			t.Fatal(err)
		}
		if cfg.Architecture != m.Platform.Architecture || cfg.OS != "linux" || !slices.Equal(cfg.Config.Entrypoint, image.Entrypoint) || cfg.Created.Unix() != 0 {
			t.Errorf("%s: config %s/%s entrypoint %v created %v", m.Platform.Architecture, cfg.OS, cfg.Architecture, cfg.Config.Entrypoint, cfg.Created)
		}
		if len(mf.Layers) != 1 {
			t.Fatalf("%s: %d layers, want 1", m.Platform.Architecture, len(mf.Layers))
		}
		layer := filepath.Join(t.TempDir(), "layer.tar.gz")
		if err := os.WriteFile(layer, blob(mf.Layers[0].Digest), 0o644); err != nil {
			t.Fatal(err)
		}
		for _, b := range image.Binaries {
			exe := layerFile(t, layer, "usr/bin/"+b)
			f, err := elf.NewFile(bytes.NewReader(exe))
			if err != nil {
				t.Fatalf("%s %s: %v", m.Platform.Architecture, b, err)
			}
			if f.Machine != machine[m.Platform.Architecture] {
				t.Errorf("%s %s is for %v", m.Platform.Architecture, b, f.Machine)
			}
			for _, p := range f.Progs {
				if p.Type == elf.PT_INTERP {
					t.Errorf("%s %s is dynamically linked", m.Platform.Architecture, b)
				}
			}
		}
	}
	if !slices.Equal(platforms, []string{"linux/amd64", "linux/arm64"}) {
		t.Errorf("platforms %v", platforms)
	}

	var dm []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	if err := json.Unmarshal(files["manifest.json"], &dm); err != nil {
		t.Fatalf("manifest.json: %v", err)
	}
	if len(dm) != 1 || !slices.Equal(dm[0].RepoTags, []string{name}) || len(dm[0].Layers) != 1 {
		t.Fatalf("manifest.json is %+v", dm)
	}
	for _, p := range append([]string{dm[0].Config}, dm[0].Layers...) {
		if _, ok := files[p]; !ok {
			t.Errorf("manifest.json names %s, which the tar does not hold", p)
		}
	}

	read, dir, err := image.ReadLayoutTar(out)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = os.RemoveAll(dir) }()
	if d, err := read.Digest(); err != nil || d != digest {
		t.Errorf("ReadLayoutTar: index %s (%v), want %s", d, err, digest)
	}
}

func hexOf(sum [32]byte) string { return hex.EncodeToString(sum[:]) }

// layerFile returns the content of one file of a gzipped layer tar.
func layerFile(t *testing.T, layer, name string) []byte {
	t.Helper()
	f, err := os.Open(layer)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			t.Fatalf("layer has no %s", name)
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Name != name {
			continue
		}
		if h.Mode != 0o755 || h.Uid != 0 || h.ModTime.Unix() != 0 {
			t.Errorf("%s: mode %o uid %d time %v", name, h.Mode, h.Uid, h.ModTime)
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		return data
	}
}
