package vfio_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
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

// TestCheckDriver: only vfio-pci and vfio variant drivers are accepted as a
// configured driver, never a host driver, whatever modules.alias says about
// the host driver's own devices.
func TestCheckDriver(t *testing.T) {
	alias := filepath.Join(t.TempDir(), "modules.alias")
	content := modulesAlias + `alias pci:v00008086d00000953sv*sd*bc*sc*i* nvme
alias pci:v*d*sv*sd*bc*sc*i* pci_stub
alias acme-passthrough acme_vfio_pci
alias vfio_pci:v00001D0Fd00007064sv*sd*bc*sc*i* vfio_pci_acme
`
	if err := os.WriteFile(alias, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, alias string
		ok          bool
	}{
		{name: "vfio-pci", ok: true},
		{name: "mlx5_vfio_pci", ok: true},
		{name: "hisi-acc-vfio-pci", ok: true},
		{name: "nvgrace_gpu_vfio_pci", alias: alias, ok: true},
		// modules.alias maps the name to a *vfio*pci* module.
		{name: "acme-passthrough", alias: alias, ok: true},
		// The name is a *vfio*pci* module that modules.alias lists.
		{name: "vfio_pci_acme", alias: alias, ok: true},
		{name: "vfio_pci_acme"}, // without modules.alias, the name alone does not say
		{name: "acme-passthrough"},
		{name: "nvme", alias: alias},
		{name: "mlx5_core", alias: alias},
		{name: "pci-stub", alias: alias},
		{name: "snd_hda_intel"},
		{name: "vfio_pci_core", alias: alias}, // a library, listed by no alias
	}
	for _, tt := range tests {
		err := vfio.CheckDriver(tt.name, tt.alias)
		switch {
		case tt.ok && err != nil:
			t.Errorf("CheckDriver(%q, %q) = %v, want accepted", tt.name, tt.alias, err)
		case !tt.ok && !errors.Is(err, vfio.ErrNotVFIODriver):
			t.Errorf("CheckDriver(%q, %q) = %v, want ErrNotVFIODriver", tt.name, tt.alias, err)
		case !tt.ok && !strings.Contains(err.Error(), tt.name):
			t.Errorf("CheckDriver(%q): error %q does not name the driver", tt.name, err)
		}
	}
	if err := vfio.CheckDriver("acme", filepath.Join(t.TempDir(), "missing")); err == nil || errors.Is(err, vfio.ErrNotVFIODriver) {
		t.Errorf("unreadable modules.alias: %v, want the read error", err)
	}
}
