package framework

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"
)

// pollInterval is how often the wait helpers look at the API. Requests are cheap
// on loopback and the scheduler reacts within tens of milliseconds.
const pollInterval = 50 * time.Millisecond

// CreateNode creates a Node that the scheduler can place pods on: it has room for
// pods and no taints. No kubelet runs for it, so its pods never start.
func CreateNode(ctx context.Context, client kubernetes.Interface, name string) (*v1.Node, error) {
	resources := v1.ResourceList{
		v1.ResourceCPU:    resource.MustParse("8"),
		v1.ResourceMemory: resource.MustParse("32Gi"),
		v1.ResourcePods:   resource.MustParse("110"),
	}
	node := &v1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name:   name,
			Labels: map[string]string{v1.LabelHostname: name},
		},
		Status: v1.NodeStatus{
			Capacity:    resources,
			Allocatable: resources,
			Conditions: []v1.NodeCondition{{
				Type:   v1.NodeReady,
				Status: v1.ConditionTrue,
				Reason: "E2ENode",
			}},
		},
	}
	node, err := client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("create Node %s: %w", name, err)
	}
	return node, nil
}

// CreateNamespace creates a namespace with a generated name that starts with
// prefix. Nothing deletes it: the control plane is thrown away after the test.
func CreateNamespace(ctx context.Context, client kubernetes.Interface, prefix string) (string, error) {
	ns, err := client.CoreV1().Namespaces().Create(ctx, &v1.Namespace{
		ObjectMeta: metav1.ObjectMeta{GenerateName: prefix + "-"},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("create namespace: %w", err)
	}
	return ns.Name, nil
}

// NewPod returns a pod with one container that uses the named ResourceClaims,
// each of them listed in spec.resourceClaims under the claim's own name. The image
// is never pulled.
func NewPod(namespace, name string, claimNames ...string) *v1.Pod {
	pod := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name},
		Spec: v1.PodSpec{
			Containers: []v1.Container{{Name: "main", Image: "registry.invalid/not-pulled:none"}},
		},
	}
	for _, claim := range claimNames {
		pod.Spec.ResourceClaims = append(pod.Spec.ResourceClaims, v1.PodResourceClaim{Name: claim, ResourceClaimName: ptr.To(claim)})
		pod.Spec.Containers[0].Resources.Claims = append(pod.Spec.Containers[0].Resources.Claims, v1.ResourceClaim{Name: claim})
	}
	return pod
}

// Poll calls condition every pollInterval until it returns true or an error, or
// until timeout. On timeout, the error includes what condition last described.
func Poll(ctx context.Context, timeout time.Duration, what string, condition func(ctx context.Context) (done bool, state string, err error)) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	state := "not checked"
	for {
		done, s, err := condition(ctx)
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("%s: %w", what, err)
		}
		if s != "" {
			state = s
		}
		if done {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: not reached within %v; last state: %s", what, timeout, state)
		case <-time.After(pollInterval):
		}
	}
}

// WaitForPodScheduled waits until the scheduler has bound the pod to a node and
// returns the bound pod.
func WaitForPodScheduled(ctx context.Context, client kubernetes.Interface, namespace, name string, timeout time.Duration) (*v1.Pod, error) {
	var pod *v1.Pod
	err := Poll(ctx, timeout, fmt.Sprintf("pod %s/%s scheduled", namespace, name), func(ctx context.Context) (bool, string, error) {
		var err error
		pod, err = client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, "", err
		}
		return pod.Spec.NodeName != "", describeScheduling(pod), nil
	})
	if err != nil {
		return nil, err
	}
	return pod, nil
}

// WaitForPodUnschedulable waits until the scheduler has marked the pod
// unschedulable (condition PodScheduled=False, reason Unschedulable) and returns
// the pod; the condition's message says why.
func WaitForPodUnschedulable(ctx context.Context, client kubernetes.Interface, namespace, name string, timeout time.Duration) (*v1.Pod, error) {
	var pod *v1.Pod
	err := Poll(ctx, timeout, fmt.Sprintf("pod %s/%s unschedulable", namespace, name), func(ctx context.Context) (bool, string, error) {
		var err error
		pod, err = client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, "", err
		}
		if pod.Spec.NodeName != "" {
			return false, "", fmt.Errorf("pod was bound to node %s", pod.Spec.NodeName)
		}
		cond := podScheduledCondition(pod)
		return cond != nil && cond.Status == v1.ConditionFalse && cond.Reason == v1.PodReasonUnschedulable, describeScheduling(pod), nil
	})
	if err != nil {
		return nil, err
	}
	return pod, nil
}

// EnsurePodStaysUnscheduled checks for the whole duration that the pod is not
// bound to a node.
func EnsurePodStaysUnscheduled(ctx context.Context, client kubernetes.Interface, namespace, name string, duration time.Duration) error {
	deadline := time.Now().Add(duration)
	for {
		pod, err := client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("get pod %s/%s: %w", namespace, name, err)
		}
		if pod.Spec.NodeName != "" {
			return fmt.Errorf("pod %s/%s was bound to node %s, expected it to stay unscheduled", namespace, name, pod.Spec.NodeName)
		}
		if time.Now().After(deadline) {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(pollInterval):
		}
	}
}

// DeletePodNow deletes the pod without a grace period, as "kubectl delete
// --force --grace-period=0" does: without a kubelet nothing would confirm a
// graceful deletion. It waits until the pod is gone.
func DeletePodNow(ctx context.Context, client kubernetes.Interface, namespace, name string, timeout time.Duration) error {
	err := client.CoreV1().Pods(namespace).Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)})
	if err != nil {
		return fmt.Errorf("delete pod %s/%s: %w", namespace, name, err)
	}
	return Poll(ctx, timeout, fmt.Sprintf("pod %s/%s deleted", namespace, name), func(ctx context.Context) (bool, string, error) {
		pod, err := client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true, "", nil
		}
		if err != nil {
			return false, "", err
		}
		return false, fmt.Sprintf("finalizers %v, deletionTimestamp %v", pod.Finalizers, pod.DeletionTimestamp), nil
	})
}

// WaitForClaim waits until condition accepts the ResourceClaim and returns it.
func WaitForClaim(ctx context.Context, client kubernetes.Interface, namespace, name string, timeout time.Duration, what string, condition func(*resourceapi.ResourceClaim) bool) (*resourceapi.ResourceClaim, error) {
	var claim *resourceapi.ResourceClaim
	err := Poll(ctx, timeout, fmt.Sprintf("ResourceClaim %s/%s %s", namespace, name, what), func(ctx context.Context) (bool, string, error) {
		var err error
		claim, err = client.ResourceV1().ResourceClaims(namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, "", err
		}
		return condition(claim), describeClaim(claim), nil
	})
	if err != nil {
		return nil, err
	}
	return claim, nil
}

// ClaimAllocated is a WaitForClaim condition.
func ClaimAllocated(claim *resourceapi.ResourceClaim) bool { return claim.Status.Allocation != nil }

// ClaimDeallocated is a WaitForClaim condition: no allocation and no consumers.
func ClaimDeallocated(claim *resourceapi.ResourceClaim) bool {
	return claim.Status.Allocation == nil && len(claim.Status.ReservedFor) == 0
}

func podScheduledCondition(pod *v1.Pod) *v1.PodCondition {
	for i := range pod.Status.Conditions {
		if pod.Status.Conditions[i].Type == v1.PodScheduled {
			return &pod.Status.Conditions[i]
		}
	}
	return nil
}

func describeScheduling(pod *v1.Pod) string {
	if pod.Spec.NodeName != "" {
		return "bound to " + pod.Spec.NodeName
	}
	cond := podScheduledCondition(pod)
	if cond == nil {
		return "no PodScheduled condition yet"
	}
	return fmt.Sprintf("PodScheduled=%s reason=%q message=%q", cond.Status, cond.Reason, cond.Message)
}

func describeClaim(claim *resourceapi.ResourceClaim) string {
	var devices []string
	if claim.Status.Allocation != nil {
		for _, r := range claim.Status.Allocation.Devices.Results {
			devices = append(devices, r.Pool+"/"+r.Device)
		}
	}
	var consumers []string
	for _, r := range claim.Status.ReservedFor {
		consumers = append(consumers, r.Resource+"/"+r.Name)
	}
	return fmt.Sprintf("allocated=%t devices=[%s] reservedFor=[%s]", claim.Status.Allocation != nil,
		strings.Join(devices, " "), strings.Join(consumers, " "))
}
