// The Objective-C runtime types and functions metal-cpp's message sends name.
#pragma once
#include <stddef.h>
typedef struct objc_class* Class;
struct objc_object { Class isa; };
struct objc_class { Class isa; };
typedef struct objc_object* id;
typedef struct objc_selector* SEL;
typedef signed char BOOL;
extern "C" {
SEL sel_registerName(const char*);
Class objc_lookUpClass(const char*);
id objc_getClass(const char*);
id objc_getProtocol(const char*);
void objc_msgSend(void);
void objc_msgSend_stret(void);
void objc_msgSend_fpret(void);
}
