// Package inspect shows an administrator what the kubelet plugin sees on a
// node and what it would publish: the decision on every PCI function, or
// the ResourceSlices themselves.
package inspect

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"
	"text/tabwriter"

	corev1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"

	"github.com/vfio-dra/vfio-dra-driver/api/v1alpha1"
	"github.com/vfio-dra/vfio-dra-driver/pkg/checkpoint"
	"github.com/vfio-dra/vfio-dra-driver/pkg/health"
	"github.com/vfio-dra/vfio-dra-driver/pkg/hostview"
	"github.com/vfio-dra/vfio-dra-driver/pkg/inventory"
	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
	"github.com/vfio-dra/vfio-dra-driver/pkg/resources"
)

// Output formats.
const (
	FormatTable = "table"
	FormatJSON  = "json"
	FormatYAML  = "yaml"
)

// Options selects what to inspect and how to print it.
type Options struct {
	SysfsRoot string
	// ProcRoot is where the host's /proc is: what the host uses (mounts,
	// routes, processes holding VFIO devices) is read there, as the
	// plugin reads it, and the checkpoint's boot ID is compared with the
	// one there ("" skips the comparison).
	ProcRoot   string
	NodeName   string
	DriverName string
	// ConfigFile is a DriverConfiguration file; "" means none.
	ConfigFile string
	// CheckpointFile is the plugin's checkpoint; "" means none. Functions
	// that prepared claims moved to vfio are then shown with the host
	// driver they go back to, as the plugin publishes them.
	CheckpointFile string
	// HealthStateFile is the plugin's health state (its fatal AER counts);
	// "" means none. Fatal AER errors since the plugin last looked, or
	// still within their hold time, then show as taints too.
	HealthStateFile string
	Output          string
}

// Run scans the sysfs tree and prints the result to out. Functions that
// cannot be read are reported to errOut and left out, as the plugin does.
func Run(out, errOut io.Writer, o Options) error {
	if o.NodeName == "" {
		return fmt.Errorf("a node name is required")
	}
	// The API would refuse slices for it: a node name is a DNS subdomain.
	if errs := validation.IsDNS1123Subdomain(o.NodeName); len(errs) > 0 {
		return fmt.Errorf("node name %q is not a valid node name: %s", o.NodeName, strings.Join(errs, "; "))
	}
	switch o.Output {
	case FormatTable, FormatJSON, FormatYAML:
	default:
		return fmt.Errorf("unknown output format %q: want %s, %s or %s", o.Output, FormatTable, FormatJSON, FormatYAML)
	}
	var cfg *v1alpha1.DriverConfiguration
	if o.ConfigFile != "" {
		var err error
		if cfg, err = v1alpha1.LoadDriverConfiguration(o.ConfigFile); err != nil {
			return err
		}
	}
	fs, err := pci.NewFS(o.SysfsRoot)
	if err != nil {
		return err
	}
	cp := &checkpoint.Checkpoint{}
	if o.CheckpointFile != "" {
		if _, err := os.Stat(o.CheckpointFile); err != nil {
			return fmt.Errorf("checkpoint: %w", err)
		}
		if cp, err = checkpoint.NewStore(o.CheckpointFile).Get(); err != nil {
			return err
		}
		if otherBoot(errOut, cp, o.ProcRoot) {
			// The plugin forgets these claims at its next start: a
			// reboot reset every binding they describe.
			cp = &checkpoint.Checkpoint{}
		}
	}
	host := hostview.New(o.SysfsRoot, o.ProcRoot).Read(hostview.OwnOf(cp))
	if host.Unavailable != "" {
		fmt.Fprintf(errOut, "warning: the host view cannot be read, storage and network controllers are not offered: %s\n", host.Unavailable)
	}
	inv, err := inventory.Scan(fs, cfg, cp.HostDrivers(), host)
	if err != nil {
		return err
	}
	for _, p := range inv.Problems {
		fmt.Fprintf(errOut, "warning: skipped: %v\n", p)
	}
	taints := healthTaints(errOut, fs, o.DriverName, o.HealthStateFile, inv, cp)
	if o.Output == FormatTable {
		if err := printTable(out, inv, taints); err != nil {
			return err
		}
		return printClaims(out, cp)
	}
	warnHeld(errOut, cp)
	list, err := SliceListTainted(o.DriverName, o.NodeName, inv, taints)
	if err != nil {
		return err
	}
	data, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return err
	}
	if o.Output == FormatYAML {
		if data, err = yaml.JSONToYAML(data); err != nil {
			return err
		}
	} else {
		data = append(data, '\n')
	}
	_, err = out.Write(data)
	return err
}

// SliceList wraps the ResourceSlices the plugin would publish in a v1 List.
func SliceList(driverName, nodeName string, inv *inventory.Inventory) (*corev1.List, error) {
	return SliceListTainted(driverName, nodeName, inv, nil)
}

// SliceListTainted is SliceList with device taints, keyed by device name.
func SliceListTainted(driverName, nodeName string, inv *inventory.Inventory, taints map[string][]resourceapi.DeviceTaint) (*corev1.List, error) {
	list := &corev1.List{TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "List"}}
	for _, s := range resources.Slices(driverName, nodeName, resources.BuildTainted(nodeName, inv, taints)) {
		raw, err := json.Marshal(s)
		if err != nil {
			return nil, fmt.Errorf("encode ResourceSlice %s: %w", s.GenerateName, err)
		}
		list.Items = append(list.Items, runtime.RawExtension{Raw: raw})
	}
	return list, nil
}

// healthTaints judges, as the plugin does at a rescan, the offered
// functions and those of the checkpoint's prepared claims, and returns the
// taints the plugin would publish. A fatal AER count that grew is seen
// only against the plugin's health state (read, never written).
func healthTaints(errOut io.Writer, fs *pci.FS, driverName, stateFile string, inv *inventory.Inventory, cp *checkpoint.Checkpoint) map[string][]resourceapi.DeviceTaint {
	targets := health.TargetsOf(inv.Decisions, cp)
	checker := health.NewChecker(fs, health.Options{StateFile: stateFile, StateReadOnly: true})
	results, errs := checker.Check(targets.Functions, true)
	for _, err := range errs {
		fmt.Fprintf(errOut, "warning: %v\n", err)
	}
	out := map[string][]resourceapi.DeviceTaint{}
	for name, st := range targets.ByDevice(results) {
		if t := st.Taints(driverName); len(t) > 0 {
			out[name] = t
		}
	}
	return out
}

// taintString is a taint as kubectl prints one: key=value:Effect.
func taintString(t resourceapi.DeviceTaint) string {
	s := t.Key
	if t.Value != "" {
		s += "=" + t.Value
	}
	return s + ":" + string(t.Effect)
}

func printTable(out io.Writer, inv *inventory.Inventory, taints map[string][]resourceapi.DeviceTaint) error {
	w := tabwriter.NewWriter(out, 0, 8, 2, ' ', 0)
	fmt.Fprintln(w, "PCI ADDRESS\tVENDOR:DEVICE\tCLASS\tIOMMU GROUP\tDRIVER\tNUMA\tDEVICE\tDECISION")
	for _, d := range inv.Decisions {
		p := d.Device
		group := "-"
		if p.IOMMUGroup != nil {
			group = fmt.Sprintf("%d (%d)", *p.IOMMUGroup, len(d.GroupMembers))
		}
		driver := p.Driver
		if driver == "" {
			driver = "-"
		}
		numa := "-"
		if p.NUMANode >= 0 {
			numa = fmt.Sprint(p.NUMANode)
		}
		name, decision := "-", "not offered: "+d.Reason
		if d.Offered {
			name, decision = p.Address.DeviceName(), "offered"
			var ts []string
			for _, t := range taints[name] {
				ts = append(ts, taintString(t))
			}
			if len(ts) > 0 {
				decision += ", tainted " + strings.Join(ts, ", ")
			}
		}
		for _, n := range d.Notes {
			decision += " (note: " + n + ")"
		}
		fmt.Fprintf(w, "%s\t%04x:%04x\t%06x\t%s\t%s\t%s\t%s\t%s\n",
			p.Address, p.VendorID, p.DeviceID, p.Class, group, driver, numa, name, decision)
	}
	return w.Flush()
}

// otherBoot reports whether the checkpoint was written in another boot
// than the one procRoot shows, and says so on errOut.
func otherBoot(errOut io.Writer, cp *checkpoint.Checkpoint, procRoot string) bool {
	if procRoot == "" || cp.BootID == "" {
		return false
	}
	now, err := checkpoint.ReadBootID(procRoot)
	if err != nil {
		fmt.Fprintf(errOut, "warning: cannot compare the checkpoint's boot ID: %v\n", err)
		return false
	}
	if now == cp.BootID {
		return false
	}
	fmt.Fprintf(errOut, "warning: the checkpoint is from another boot (boot ID %s, this boot %s): the plugin forgets its %d claims at its next start; functions are shown as they are\n",
		cp.BootID, now, len(cp.Claims))
	return true
}

// claimStatus says what a checkpointed claim means for the node.
func claimStatus(c *checkpoint.Claim) string {
	switch {
	case c.State == checkpoint.PrepareCompleted && c.LastError == "":
		return "prepared"
	case c.State == checkpoint.PrepareCompleted:
		return "prepared, unprepare failed (the kubelet retries): " + c.LastError
	case c.LastError != "":
		return "held: prepare did not finish and giving its groups back failed (retried in the background): " + c.LastError
	default:
		return "prepare in progress, or cut short (rolled back at the plugin's next start)"
	}
}

func claimGroups(c *checkpoint.Claim) string {
	var groups []string
	for _, g := range c.Groups {
		groups = append(groups, fmt.Sprint(g.Number))
	}
	if len(groups) == 0 {
		return "-"
	}
	return strings.Join(groups, ",")
}

// printClaims lists the checkpointed claims after the table.
func printClaims(out io.Writer, cp *checkpoint.Checkpoint) error {
	if len(cp.Claims) == 0 {
		return nil
	}
	w := tabwriter.NewWriter(out, 0, 8, 2, ' ', 0)
	fmt.Fprintln(w, "\nCLAIM\tUID\tIOMMU GROUPS\tSTATUS")
	for _, uid := range slices.Sorted(maps.Keys(cp.Claims)) {
		c := cp.Claims[uid]
		fmt.Fprintf(w, "%s/%s\t%s\t%s\t%s\n", c.Namespace, c.Name, uid, claimGroups(c), claimStatus(c))
	}
	return w.Flush()
}

// warnHeld reports, beside a slice list, the claims whose groups are held
// because giving them back failed.
func warnHeld(errOut io.Writer, cp *checkpoint.Checkpoint) {
	for _, uid := range slices.Sorted(maps.Keys(cp.Claims)) {
		if c := cp.Claims[uid]; c.LastError != "" {
			fmt.Fprintf(errOut, "warning: ResourceClaim %s/%s (%s), IOMMU groups %s: %s\n", c.Namespace, c.Name, uid, claimGroups(c), claimStatus(c))
		}
	}
}
