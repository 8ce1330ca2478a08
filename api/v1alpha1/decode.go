package v1alpha1

import (
	"errors"

	sigsjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// decodeStrict decodes YAML or JSON into obj. Unknown and duplicate fields
// are errors that carry the field's path, e.g. unknown field "allow[0].vendor".
func decodeStrict(data []byte, obj any) error {
	js, err := yaml.YAMLToJSON(data)
	if err != nil {
		return err
	}
	strict, err := sigsjson.UnmarshalStrict(js, obj, sigsjson.DisallowUnknownFields)
	if err != nil {
		return err
	}
	return errors.Join(strict...)
}
