package inventory_test

import (
	"reflect"
	"testing"

	"github.com/vfio-dra/vfio-dra-driver/pkg/inventory"
)

// fill sets every field below v to a value that depends on variant.
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

func filledDecision() inventory.Decision {
	var d inventory.Decision
	fill(reflect.ValueOf(&d).Elem(), 0)
	return d
}

// TestDecisionEqualSeesEveryField changes one field of a decision (and one
// of its device) at a time: a change Equal misses would not be published.
func TestDecisionEqualSeesEveryField(t *testing.T) {
	if a, b := filledDecision(), filledDecision(); !a.Equal(b) || !inventory.EqualDecisions([]inventory.Decision{a}, []inventory.Decision{b}) {
		t.Fatal("two decisions with the same values are not Equal")
	}
	typ := reflect.TypeFor[inventory.Decision]()
	for i := range typ.NumField() {
		for _, change := range []func(reflect.Value){
			func(v reflect.Value) { fill(v, 1) },
			func(v reflect.Value) { v.Set(reflect.Zero(v.Type())) },
		} {
			a, b := filledDecision(), filledDecision()
			change(reflect.ValueOf(&b).Elem().Field(i))
			if a.Equal(b) || b.Equal(a) {
				t.Errorf("field %s: Equal does not see the change", typ.Field(i).Name)
			}
		}
	}
	a, b := filledDecision(), filledDecision()
	b.Device.Driver = "vfio-pci"
	if a.Equal(b) {
		t.Error("a change of the device is not seen")
	}
	if inventory.EqualDecisions([]inventory.Decision{a}, []inventory.Decision{a, a}) {
		t.Error("lists of different lengths are Equal")
	}
}
