package pci_test

import (
	"reflect"
	"testing"

	"github.com/vfio-dra/vfio-dra-driver/pkg/pci"
)

// filled returns a device with every field set; variant changes each value.
func filled(t *testing.T, variant int) *pci.Device {
	t.Helper()
	d := &pci.Device{}
	fill(reflect.ValueOf(d).Elem(), variant)
	return d
}

// fill sets every field of v to a value that depends on variant.
func fill(v reflect.Value, variant int) {
	switch v.Kind() {
	case reflect.Struct:
		for i := range v.NumField() {
			fill(v.Field(i), variant)
		}
	case reflect.Pointer:
		v.Set(reflect.New(v.Type().Elem()))
		fill(v.Elem(), variant)
	case reflect.Slice:
		v.Set(reflect.MakeSlice(v.Type(), 2, 2))
		for i := range 2 {
			fill(v.Index(i), variant+i)
		}
	case reflect.String:
		v.SetString(string(rune('a' + variant)))
	case reflect.Bool:
		v.SetBool(variant%2 == 0)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		v.SetInt(int64(variant + 1))
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		v.SetUint(uint64(variant + 1))
	default:
		panic("fill: unhandled kind " + v.Kind().String())
	}
}

// TestDeviceEqualSeesEveryField changes one field at a time: a field that
// Equal does not compare would let a rescan miss a change.
func TestDeviceEqualSeesEveryField(t *testing.T) {
	if a, b := filled(t, 0), filled(t, 0); !a.Equal(b) || !b.Equal(a) {
		t.Fatal("two devices with the same values are not Equal")
	}
	typ := reflect.TypeFor[pci.Device]()
	for i := range typ.NumField() {
		f := typ.Field(i)
		for _, change := range []struct {
			name string
			set  func(v reflect.Value)
		}{
			{"other value", func(v reflect.Value) { fill(v, 1) }},
			{"zero", func(v reflect.Value) { v.Set(reflect.Zero(v.Type())) }},
		} {
			a, b := filled(t, 0), filled(t, 0)
			change.set(reflect.ValueOf(b).Elem().Field(i))
			if a.Equal(b) || b.Equal(a) {
				t.Errorf("field %s (%s): Equal does not see the change", f.Name, change.name)
			}
		}
	}
	var none *pci.Device
	if !none.Equal(nil) || none.Equal(filled(t, 0)) || filled(t, 0).Equal(nil) {
		t.Error("nil devices: Equal only for two nils")
	}
}
