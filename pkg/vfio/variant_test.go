package vfio_test

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci/pcitest"
	"github.com/vfio-dra/vfio-dra-driver/pkg/vfio"
)

// A modules.alias as depmod writes it, cut down.
const modulesAlias = `# Aliases extracted from modules themselves.
alias pci:v000015B3d00001017sv*sd*bc*sc*i* mlx5_core
alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci
alias vfio_pci:v000015B3d00001018sv*sd*bc*sc*i* mlx5_vfio_pci
alias vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_vfio_pci
alias vfio_pci:v000019E5d0000A255sv*sd*bc*sc*i* hisi_acc_vfio_pci
alias vfio_pci:v000010DEd*sv*sd*bc03sc*i* nvgrace_gpu_vfio_pci
alias vfio_pci:v000010DEd00002342sv*sd*bc03sc*i* nvgrace_gpu_vfio_pci_specific
`

func TestVariantDriver(t *testing.T) {
	root := t.TempDir()
	tree, err := pcitest.NewServer(root)
	if err != nil {
		t.Fatal(err)
	}
	if err := tree.AddDriver("mlx5_vfio_pci"); err != nil {
		t.Fatal(err)
	}
	alias := filepath.Join(t.TempDir(), "modules.alias")
	if err := os.WriteFile(alias, []byte(modulesAlias), 0o644); err != nil {
		t.Fatal(err)
	}
	fs, err := pci.NewFS(root)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		addr    string
		want    string
		wantErr error
	}{
		{addr: "0000:81:00.2", want: "mlx5_vfio_pci"},            // ConnectX-5 VF
		{addr: "0000:81:00.0", want: ""},                         // PF: no variant
		{addr: "0000:82:00.0", want: ""},                         // only the vfio_pci catch-all
		{addr: "0000:01:00.0", wantErr: vfio.ErrDriverNotLoaded}, // nvgrace matches, not loaded
	}
	for _, tt := range tests {
		a, _ := pci.ParseAddress(tt.addr)
		got, err := vfio.VariantDriver(fs, a, alias)
		if !errors.Is(err, tt.wantErr) || got != tt.want {
			t.Errorf("VariantDriver(%s) = %q, %v; want %q, %v", tt.addr, got, err, tt.want, tt.wantErr)
		}
	}
	a, _ := pci.ParseAddress("0000:01:00.0")
	if _, err := vfio.VariantDriver(fs, a, filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Error("missing modules.alias: no error")
	}
}

// TestMemberTargets: "auto" is resolved per member, so a GPU's variant is
// not forced onto its audio function, nor a VF's onto the PF.
func TestMemberTargets(t *testing.T) {
	root := t.TempDir()
	tree, err := pcitest.NewServer(root)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"mlx5_vfio_pci", "nvgrace_gpu_vfio_pci"} {
		if err := tree.AddDriver(d); err != nil {
			t.Fatal(err)
		}
	}
	alias := filepath.Join(t.TempDir(), "modules.alias")
	if err := os.WriteFile(alias, []byte(modulesAlias), 0o644); err != nil {
		t.Fatal(err)
	}
	fs, err := pci.NewFS(root)
	if err != nil {
		t.Fatal(err)
	}
	addr := func(s string) pci.Address { a, _ := pci.ParseAddress(s); return a }
	gpu, audio, pf, vf := addr("0000:01:00.0"), addr("0000:01:00.1"), addr("0000:81:00.0"), addr("0000:81:00.2")
	got, err := vfio.MemberTargets(fs, []pci.Address{gpu, audio, pf, vf}, alias)
	if err != nil {
		t.Fatal(err)
	}
	want := map[pci.Address]string{gpu: "nvgrace_gpu_vfio_pci", audio: "vfio-pci", pf: "vfio-pci", vf: "mlx5_vfio_pci"}
	for a, w := range want {
		if got[a] != w {
			t.Errorf("%s: %q, want %q", a, got[a], w)
		}
	}
	if _, err := vfio.MemberTargets(fs, []pci.Address{addr("0000:09:00.0")}, alias); err == nil {
		t.Error("a member that does not exist: no error")
	}
}
